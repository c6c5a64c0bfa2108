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

import contextlib
import json
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig
from .errors import CheckpointError
from .model.qwen35 import Qwen35ForCausalLM
from .ops.fast import bind_kernels
from .placement import allocate, quantize_into
from .quant.formats import all_finite
from .safetensors_io import SafetensorsReader, TensorEntry, read_header

log = logging.getLogger("qwen35")

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
VLM_TEXT_PREFIX = "model.language_model."
VISION_PREFIX = "model.visual."


@dataclass
class CheckpointInfo:
    """What was found on disk; kept on the model as `model.checkpoint_info`."""

    path: Path
    files: list[Path]
    layout: str  # "vlm" or "text"
    skipped: list[str] = field(default_factory=list)  # checkpoint keys not loaded (vision tower, tied head)
    nbytes: int = 0


def read_weight_map(index: Path) -> dict[str, str]:
    """A safetensors index's weight map (tensor -> shard file), every shard a file name inside the checkpoint
    directory: anything else is a CheckpointError naming the index and the tensor (not a TypeError joining a
    path to a number, nor a read of a file outside the checkpoint). verify reads indexes through this too."""
    from .manifest import file_name_problem

    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map' object)") from None
    for key, shard in weight_map.items():
        if problem := file_name_problem(shard):
            raise CheckpointError(f"{index}: weight_map entry '{key}': {problem}")
    return weight_map


def find_weight_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint, and the index's weight map when there is one."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = read_weight_map(index)
        files = []
        for name in dict.fromkeys(weight_map.values()):
            f = path / name
            if not f.is_file():
                raise CheckpointError(f"{index} lists shard '{name}', which is missing from {path}")
            files.append(f)
        return files, weight_map
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE], None
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        return shards, None
    raise CheckpointError(f"no weights found in {path}: expected {SINGLE_FILE} or {INDEX_FILE}")


def read_checkpoint_entries(path: Path) -> tuple[dict[str, TensorEntry], list[Path]]:
    files, weight_map = find_weight_files(path)
    entries: dict[str, TensorEntry] = {}
    for f in files:
        for name, e in read_header(f).items():
            if name in entries:
                raise CheckpointError(f"tensor '{name}' appears in both {entries[name].file.name} and {f.name}")
            entries[name] = e
    if weight_map is not None:
        for name, shard in weight_map.items():
            if name not in entries:
                raise CheckpointError(f"{INDEX_FILE} maps tensor '{name}' to '{shard}', which does not contain it")
    return entries, files


def to_module_name(key: str, layout: str) -> str | None:
    """Checkpoint key -> our parameter name; None for keys we keep on disk only (vision tower)."""
    if key.startswith(VISION_PREFIX):
        return None
    if layout == "vlm" and key.startswith(VLM_TEXT_PREFIX):
        return "model." + key[len(VLM_TEXT_PREFIX):]
    return key


def count_mtp_layers(keys) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(r"mtp\.layers\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def check_mtp_layers(config: ModelConfig, found: int) -> None:
    """A checkpoint's MTP layers (count_mtp_layers; none is fine: many conversions drop the head) against the
    config's count."""
    if found and config.mtp_num_hidden_layers and found != config.mtp_num_hidden_layers:
        raise CheckpointError(f"config says mtp_num_hidden_layers={config.mtp_num_hidden_layers} but the "
                              f"checkpoint has {found} mtp.layers")


def meta_model(config: ModelConfig, mtp_layers: int = 0) -> Qwen35ForCausalLM:
    """The model's skeleton on the meta device: its parameter names and shapes, no memory, no init."""
    with torch.device("meta"), _skip_init():
        return Qwen35ForCausalLM(config, mtp_layers=mtp_layers)


def parameter_shapes(config: ModelConfig, mtp_layers: int = 0) -> dict[str, tuple[int, ...]]:
    """Every parameter the config implies (with `mtp_layers` MTP layers), name -> shape: what a checkpoint
    of it must hold."""
    return {n: tuple(p.shape) for n, p in meta_model(config, mtp_layers).named_parameters()}


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, progress: bool = False,
               kernels: bool | None = None, quant: str | None = None,
               kv_cache: str = "bf16") -> Qwen35ForCausalLM:
    """Load a Qwen3.5 checkpoint directory, or a `qwen35` GGUF file (qwen35/gguf/loader.py).
    dtype: torch.float32, torch.bfloat16 or torch.float16.
    progress: show a progress bar (bytes read) on stderr. kernels: bind the C++ CPU kernels (True), run the
    torch reference only (False), or let `ops.fast.kernel_policy` decide (None; see there).
    quant: a quantization policy (quant/policy.py: "int8", "int4", "q8_0", "q4_0", "q4_k", "q6_k"): matrices
    are quantized tensor by tensor as they are read, in bands of rows (peak memory ~ the quantized model + one
    band).
    kv_cache: how caches made for this model (`model.make_cache`) store the attention layers' keys and values:
    "bf16" (the model's dtype) or "q8_0" (8-bit blocks, kv_storage.py); sets `model.kv_cache`.

    Raises ConfigError / CheckpointError (both Qwen35Error) naming the file or tensor at fault.
    """
    if dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"dtype {dtype} is not supported; use torch.float32, torch.bfloat16 or torch.float16")
    from .kv_storage import check_kv_cache

    check_kv_cache(kv_cache)  # before reading gigabytes
    if kv_cache != "bf16":  # a blocked format must also fit the model's heads: read the config alone first
        check_kv_cache(kv_cache, _head_dim(Path(path)))
    model = _load_model(Path(path), dtype, progress, kernels, quant)
    model.kv_cache = kv_cache
    return model


def check_not_adapters(path: str | Path) -> None:
    """A `qwen35 train --quant` output holds the LoRA adapters alone (lora.safetensors + adapter_config.json):
    say so and name what to load, where a missing config.json would only say it is missing."""
    path = Path(path)
    if not (path.is_dir() and not (path / "config.json").is_file() and (path / "adapter_config.json").is_file()):
        return
    try:
        base = json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get("base")
    except (OSError, ValueError, AttributeError):
        base = None
    on = f" (their base: {base})" if base else ""
    if (path / "merged" / "config.json").is_file():
        fix = f"load {path / 'merged'}, the merged model"
    else:
        fix = (f"write the merged model with `qwen35 train ... --out {path} --resume --merge bf16` and load "
               f"{path / 'merged'}")
    raise CheckpointError(f"{path} holds LoRA adapters only{on}, not a model: {fix}")


def _head_dim(path: Path) -> int | None:
    """The attention head_dim from a checkpoint's config (a directory's config.json, a GGUF's metadata) without
    loading it; None where there is no config to read (_load_model then says what is wrong with the path)."""
    from .gguf.reader import is_gguf_path
    if is_gguf_path(path) and path.is_file():
        from .gguf import read_config

        return read_config(path).head_dim
    check_not_adapters(path)
    return ModelConfig.from_file(path).head_dim if path.is_dir() else None


@dataclass
class _Index:
    """A checkpoint directory's tensors checked against its config: our parameter names -> file entries."""

    config: ModelConfig
    info: CheckpointInfo
    model: Qwen35ForCausalLM  # on the meta device: names and shapes
    by_name: dict[str, TensorEntry]
    vision: dict[str, TensorEntry]
    qcfg: dict | None
    stored: dict[str, str]  # parameter -> layout, for a quantized checkpoint's matrices
    shapes: dict[str, tuple[int, ...]]
    wanted: list[str]  # the entries to read (NAME.qs / NAME.d for the stored matrices)


def _index(path: Path) -> _Index:
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; point at the folder holding config.json and weights")
    check_not_adapters(path)
    config = ModelConfig.from_file(path)
    entries, files = read_checkpoint_entries(path)

    layout = "vlm" if any(k.startswith(VLM_TEXT_PREFIX) for k in entries) else "text"
    info = CheckpointInfo(path=path, files=files, layout=layout)
    by_name: dict[str, TensorEntry] = {}
    vision: dict[str, TensorEntry] = {}
    for key, e in entries.items():
        name = to_module_name(key, layout)
        if name is not None:
            by_name[name] = e
        elif key.startswith(VISION_PREFIX) and config.vision_config is not None:
            vision[key[len(VISION_PREFIX):]] = e
        else:
            info.skipped.append(key)

    mtp_layers = count_mtp_layers(by_name)
    check_mtp_layers(config, mtp_layers)
    if "lm_head.weight" not in by_name and "lm_head.weight.qs" not in by_name and not config.tie_word_embeddings:
        log.warning("%s: no lm_head.weight and tie_word_embeddings=false; using the embedding as the head", path)
        config = _replace(config, tie_word_embeddings=True)
    if config.tie_word_embeddings and "lm_head.weight" in by_name:
        info.skipped.append(_disk_key("lm_head.weight", by_name))
        del by_name["lm_head.weight"]

    model = meta_model(config, mtp_layers)

    from .quant.checkpoint import read_quant_config

    qcfg = read_quant_config(path)
    stored = qcfg["tensors"] if qcfg else {}
    expected = dict(model.named_parameters())
    bad = [n for n in stored if n not in expected]
    if bad:
        raise CheckpointError(f"{path}: quantization_config names '{bad[0]}', which this model does not have")
    wanted = [n for n in expected if n not in stored] + [n + s for n in stored for s in (".qs", ".d")]
    missing = [n for n in wanted if n not in by_name]
    if missing:
        raise CheckpointError(f"{path}: missing tensor '{_ckpt_key(missing[0], layout)}'"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    wanted_set = set(wanted)
    unexpected = [n for n in by_name if n not in wanted_set]
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor '{_disk_key(unexpected[0], by_name)}'"
                              + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    shapes = {n: tuple(p.shape) for n, p in expected.items()}
    return _Index(config, info, model, by_name, vision, qcfg, stored, shapes, wanted)


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


def _check_entry(path: Path, e: TensorEntry, shape: tuple[int, ...]) -> None:
    if tuple(e.shape) != shape:
        raise CheckpointError(f"{path}: shape mismatch for '{e.name}': checkpoint has {list(e.shape)}, "
                              f"the config implies {list(shape)}")
    if not e.dtype.is_floating_point:
        raise CheckpointError(f"{path}: tensor '{e.name}' has non-float dtype {e.dtype}")


class CheckpointTensors:
    """A checkpoint directory's text-model parameters read on demand, a band of rows at a time, without
    loading the model (the ONNX export's source: peak memory one band, whatever the model's size).
    `shapes`: parameter name -> shape; `rows(name, a, b)`: rows a..b-1 as stored (a quantized checkpoint's
    matrices dequantized to fp32). Checked like `load_model` (names, shapes, dtypes)."""

    def __init__(self, path: str | Path):
        idx = _index(Path(path))
        self.path, self.config, self._idx = Path(path), idx.config, idx
        self.shapes = {n: s for n, s in idx.shapes.items() if not n.startswith("mtp.")}
        self._readers: dict[Path, SafetensorsReader] = {}

    def _read(self, e: TensorEntry) -> torch.Tensor:
        reader = self._readers.get(e.file) or self._readers.setdefault(e.file, SafetensorsReader(e.file))
        return reader.read(e)

    def rows(self, name: str, a: int, b: int) -> torch.Tensor:
        idx = self._idx
        if not 0 <= a <= b <= idx.shapes[name][0]:
            raise IndexError(f"rows {a}..{b} of '{name}', which has {idx.shapes[name][0]}")
        if name in idx.stored:
            from .quant.checkpoint import check_stored
            from .quant.formats import dequantize

            e_qs, e_d = idx.by_name[name + ".qs"], idx.by_name[name + ".d"]
            check_stored(self.path, name, e_qs, e_d, idx.stored[name], *idx.shapes[name])
            d = self._read(_rows(e_d, a, b)) if e_d.nbytes else torch.empty(b - a, 0, dtype=torch.float16)
            return dequantize(idx.stored[name], self._read(_rows(e_qs, a, b)), d)
        e = idx.by_name[name]
        _check_entry(self.path, e, idx.shapes[name])
        return self._read(_rows(e, a, b))

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()


def _load_model(path: Path, dtype: torch.dtype, progress: bool, kernels: bool | None, quant: str | None):
    from .gguf.reader import is_gguf_path
    path = Path(path)
    if is_gguf_path(path) and path.exists():  # one GGUF file, or any part of a split one
        from .gguf import load_gguf

        return load_gguf(path, dtype=dtype, progress=progress, kernels=kernels, quant=quant)
    idx = _index(path)
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
        band = _rows(e, a, b)
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
            _check_entry(path, e, shapes[name])
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
    with torch.device("meta"), _skip_init():
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


@contextlib.contextmanager
def _skip_init():
    """Skip torch's random init while building on the meta device: every value is about to be read from
    disk, and init on meta tensors drags in torch._dynamo (a 1 s import)."""
    names = ("kaiming_uniform_", "uniform_", "normal_")
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda tensor, *a, **k: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


def _rows(e: TensorEntry, a: int, b: int) -> TensorEntry:
    """Rows a..b-1 of a stored matrix, as an entry of their own (rows are contiguous on disk)."""
    row = e.nbytes // e.shape[0]
    return replace(e, shape=(b - a, *e.shape[1:]), start=e.start + a * row, nbytes=(b - a) * row)


def _ckpt_key(name: str, layout: str) -> str:
    if layout == "vlm" and name.startswith("model."):
        return VLM_TEXT_PREFIX + name[len("model."):]
    return name


def _disk_key(name: str, by_name: dict[str, TensorEntry]) -> str:
    return by_name[name].name


def _replace(config: ModelConfig, **changes) -> ModelConfig:
    return replace(config, **changes)
