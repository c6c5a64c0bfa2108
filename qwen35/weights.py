"""Load a Qwen3.5 checkpoint directory into a Qwen35ForCausalLM.

Layouts understood:
- single `model.safetensors`, or shards listed in `model.safetensors.index.json` (any shard file names,
  including the official `model.safetensors-0000K-of-0000N.safetensors`);
- the official VLM keys (`model.language_model.*`, `model.visual.*`, `lm_head.weight`, `mtp.*`) and the
  text-only keys (`model.*`);
- mixed dtypes on disk (Qwen3.5 ships A_log and the Gated DeltaNet norm in F32, the rest in BF16).

Dtype rules: everything is cast to the requested dtype except A_log, dt_bias and all norm weights, which
stay fp32 (tiny, and they feed fp32 math). The model is built on the meta device and each tensor is read
straight into its final storage, so peak memory is about one copy of the weights.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from .checkpoint_index import (
    VISION_PREFIX,
    check_entry,
    check_not_adapters,
    index_checkpoint,
    row_band,
    skip_init,
)
from .config import ModelConfig
from .errors import CheckpointError
from .model.qwen35 import Qwen35ForCausalLM
from .ops.fast import bind_kernels
from .placement import allocate, quantize_into
from .quant.formats import all_finite
from .safetensors_io import SafetensorsReader, TensorEntry

log = logging.getLogger("qwen35")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, progress: bool = False,
               kernels: bool | None = None, quant: str | None = None,
               kv_cache: str = "bf16", mmproj: str | Path | Literal[False] | None = None) -> Qwen35ForCausalLM:
    """Load a Qwen3.5 checkpoint directory, or a `qwen35` GGUF file (qwen35/gguf/loader.py).
    dtype: torch.float32, torch.bfloat16 or torch.float16.
    progress: show a progress bar (bytes read) on stderr. kernels: bind the C++ CPU kernels (True), run the
    torch reference only (False), or let `ops.fast.kernel_policy` decide (None; see there).
    quant: a quantization policy (quant/policy.py: "int8", "int4", "q8_0", "q4_0", "q4_k", "q6_k"): matrices
    are quantized tensor by tensor as they are read, in bands of rows (peak memory ~ the quantized model + one
    band).
    kv_cache: how caches made for this model (`model.make_cache`) store the attention layers' keys and values:
    "bf16" (the model's dtype) or "q8_0" (8-bit blocks, kv_storage.py); sets `model.kv_cache`.
    mmproj: a llama.cpp mmproj GGUF (gguf/mmproj.py) whose vision tower is attached as `model.visual`, in
    `dtype` (quant= leaves it alone, as it does a checkpoint's tower); for a model without a tower of its own.
    None (the default): for a GGUF, the `mmproj-<stem>.gguf` beside it where there is one (find_mmproj; one info
    line names it; a found file that does not fit the model is an error, not skipped). False: none, the text
    model alone.

    Raises ConfigError / CheckpointError (both Qwen35Error) naming the file or tensor at fault.
    """
    if dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"dtype {dtype} is not supported; use torch.float32, torch.bfloat16 or torch.float16")
    from .kv_storage import check_kv_cache

    check_kv_cache(kv_cache)  # before reading gigabytes
    if mmproj is not None and mmproj is not False and not isinstance(mmproj, (str, Path)):
        raise TypeError(f"mmproj= takes a path, None (the mmproj-<name>.gguf beside a GGUF) or False (none), "
                        f"not {mmproj!r}")
    found = mmproj is None
    if found:
        from .gguf.mmproj import find_mmproj

        mmproj = find_mmproj(path)
    elif mmproj is False:
        mmproj = None
    # the config alone, read once, for the checks that must come before the weights load
    config = _read_config(Path(path)) if kv_cache != "bf16" or mmproj is not None else None
    if kv_cache != "bf16":  # a blocked format must also fit the model's heads
        check_kv_cache(kv_cache, config.head_dim if config is not None else None)
    if mmproj is not None:  # a missing, foreign or mismatched mmproj is said before the text model loads
        from .gguf.mmproj import check_mmproj

        with _found_mmproj(path, mmproj, found):  # (the text model's own errors are its own, not the mmproj's)
            check_mmproj(mmproj, config)
    model = _load_model(Path(path), dtype, progress, kernels, quant)
    model.kv_cache = kv_cache
    if mmproj is not None:
        from .gguf.mmproj import attach_mmproj

        with _found_mmproj(path, mmproj, found):
            attach_mmproj(model, mmproj, dtype, source=Path(path))
        if found:
            log.info(f"mmproj: attached {mmproj}, found beside {Path(path).name} (mmproj=False or --no-mmproj: "
                     "the text model alone)")
    model.mmproj_found = mmproj if found else None  # (the commands say it: their users see no info log)
    return model


@contextmanager
def _found_mmproj(path, mmproj: Path, found: bool):
    """A CheckpointError about an mmproj load_model found rather than was given says so, and how to opt out:
    skipping a file that does not fit would hide the problem (a stale or another model's tower)."""
    if not found:
        yield
        return
    try:
        yield
    except CheckpointError as e:
        raise CheckpointError(f"{e} ({mmproj.name} was found beside {Path(path).name} as its mmproj: pass "
                              "mmproj=False, or --no-mmproj, to load the text model alone, or name the right "
                              "one with mmproj= / --mmproj)") from None


def _read_config(path: Path) -> ModelConfig | None:
    """A checkpoint's config (a directory's config.json, a GGUF's metadata) without loading its weights; None
    where there is no config to read (_load_model then says what is wrong with the path)."""
    from .gguf.reader import is_gguf_path
    if is_gguf_path(path) and path.is_file():
        from .gguf import read_config

        return read_config(path)
    check_not_adapters(path)
    return ModelConfig.from_file(path) if path.is_dir() else None


def check_finite(where, name: str, t: torch.Tensor, source_dtype: torch.dtype | None = None) -> None:
    """Refuse a weight holding NaN or an infinity, naming it: a corrupt (or mis-converted) checkpoint. Without
    this it surfaced far from its cause, as token 0 from greedy decoding, or as plausible text once quantized
    (the quantizers map a NaN to a finite code). One reduction, ~2% of a load (the 0.8B's 773M weights in
    ~50 ms on 2 cores; a band being quantized is checked while it is in cache)."""
    if not t.is_floating_point() or all_finite(t):
        return
    n = int((~torch.isfinite(t)).sum())
    wider = source_dtype is not None and t.dtype == torch.float16 and source_dtype != torch.float16
    hint = " (or values past float16's range of +-65504: load it in bfloat16 or float32)" if wider else ""
    raise CheckpointError(f"{where}: tensor '{name}' holds {n} NaN or infinite value{'s' if n != 1 else ''}"
                          f"{hint}: the checkpoint is corrupt")


def _load_model(path: Path, dtype: torch.dtype, progress: bool, kernels: bool | None, quant: str | None):
    from .gguf.reader import is_gguf_path
    path = Path(path)
    if is_gguf_path(path) and path.exists():  # one GGUF file, or any part of a split one
        from .gguf import load_gguf

        return load_gguf(path, dtype=dtype, progress=progress, kernels=kernels, quant=quant)
    idx = index_checkpoint(path)
    config, info, model, by_name, vision = idx.config, idx.info, idx.model, idx.by_name, idx.vision
    qcfg, stored, wanted, shapes = idx.qcfg, idx.stored, idx.wanted, idx.shapes
    if qcfg and quant not in (None, qcfg.get("policy")):
        raise CheckpointError(f"{path} is already quantized ({qcfg.get('policy')}); load it without quant=, or "
                              f"quantize the original checkpoint with {quant}")
    from .quant.checkpoint import check_stored

    plan = dict(stored)
    if quant is not None and not stored:
        from .quant import policy

        plan = policy.plan(quant, shapes, config.tie_word_embeddings)
    sinks = allocate(model, dtype, plan)
    readers: dict[Path, SafetensorsReader] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        total = sum(by_name[n].nbytes for n in wanted)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {path.name}", leave=False,
                   disable=None)  # None: not drawn where stderr is no terminal (a log, a pipe)

    def read(e: TensorEntry, dest: torch.Tensor | None = None) -> torch.Tensor:
        reader = readers.get(e.file) or readers.setdefault(e.file, SafetensorsReader(e.file))
        out = reader.read(e, dest)
        check_finite(e.file, e.name, out, e.dtype)
        info.nbytes += e.nbytes
        if bar is not None:
            bar.update(e.nbytes)
        return out

    scratch = torch.empty(0, dtype=torch.uint8)

    def read_rows(e: TensorEntry, a: int, b: int) -> torch.Tensor:
        # every band of every matrix lands in one buffer: a fresh tensor per band left the heap holding
        # ~90 MB of freed bands (4B int4) after the load
        nonlocal scratch
        band = row_band(e, a, b)
        if scratch.numel() < band.nbytes:
            scratch = torch.empty(band.nbytes, dtype=torch.uint8)
        return read(band, scratch[: band.nbytes].view(band.dtype).view(band.shape))

    try:
        for name, sink in sinks.items():
            if name in stored:  # packed bytes and scales, read straight into place
                qw, row, n = sink
                e_qs, e_d = by_name[name + ".qs"], by_name[name + ".d"]
                check_stored(path, name, e_qs, e_d, stored[name], *shapes[name])
                read(e_qs, qw.qs[row : row + n])
                read(e_d, qw.d[row : row + n])
                continue
            e = by_name[name]
            check_entry(path, e, shapes[name])
            if isinstance(sink, torch.Tensor):
                read(e, sink)
            else:  # band by band from the mapped file: never a whole bf16 copy of the matrix in memory
                quantize_into(sink, lambda a, b, e=e: read_rows(e, a, b))
        if vision:
            attach_vision(model, _load_vision(path, config, vision, read, dtype))
    finally:
        if bar is not None:
            bar.close()
        for r in readers.values():
            r.close()
    model.eval()
    model.requires_grad_(False)
    model.checkpoint_info = info
    model.quant = quant if quant is not None else (qcfg or {}).get("policy")
    bind_kernels(model, kernels)
    return model


def attach_vision(model: Qwen35ForCausalLM, tower) -> None:
    """Give `model` its vision tower as `model.visual`, outside the module tree on purpose: what walks the
    text model's parameters (projection fusion, quantization, LoRA, checkpoint writing, .to()) must not see
    the tower, which keeps its own dtype and is only ever run for inference."""
    object.__setattr__(model, "visual", tower)


def _load_vision(path: Path, config: ModelConfig, entries: dict[str, TensorEntry], read, dtype: torch.dtype):
    """The vision tower from the checkpoint's `model.visual.*` tensors (names without the prefix): in `dtype`,
    its LayerNorm parameters in fp32 (they feed fp32 math, as the text model's norms do)."""
    from .model.vision import VisionConfig, VisionModel

    vcfg = VisionConfig.from_hf(config.vision_config, str(path / "config.json"))
    with torch.device("meta"), skip_init():
        tower = VisionModel(vcfg)
    params = dict(tower.named_parameters())
    missing = [n for n in params if n not in entries]
    unexpected = [n for n in entries if n not in params]
    for names, what in ((missing, "missing tensor"), (unexpected, "unexpected tensor")):
        if names:
            raise CheckpointError(f"{path}: {what} '{VISION_PREFIX}{names[0]}'"
                                  + (f" (and {len(names) - 1} more)" if len(names) > 1 else ""))
    for name, p in params.items():
        e = entries[name]
        if tuple(e.shape) != tuple(p.shape):
            raise CheckpointError(f"{path}: shape mismatch for '{e.name}': checkpoint has {list(e.shape)}, "
                                  f"the vision config implies {list(p.shape)}")
        keep = torch.float32 if "norm" in name.split(".")[-2] else dtype
        t = read(e).to(keep)
        mod_name, _, attr = name.rpartition(".")
        setattr(tower.get_submodule(mod_name), attr, nn.Parameter(t, requires_grad=False))
    from .vision_input import ImageProcessor

    tower.processor = ImageProcessor.from_model_dir(path, vcfg)  # the checkpoint's preprocessor_config.json
    return tower.eval()
