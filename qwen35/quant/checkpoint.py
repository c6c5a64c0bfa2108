"""Quantized checkpoints: what `qwen35 quantize` writes and `load_model` reads back without requantizing.

Layout: the ordinary checkpoint (config.json, safetensors shards + index, tokenizer and template files
copied beside), where every quantized matrix `NAME` is stored as two tensors, `NAME.qs` (int8 for q8_0, uint8
for the others) and `NAME.d` (fp16 scales; [N, 0] for q4_k / q6_k, whose qs are GGUF's blocks with their scales inside), under our (text-model) parameter names, one per projection (not fused:
the file stays readable tensor by tensor, and fusing at load is a row concatenation into the huge-page arena,
which measured ~10% faster decode than weights left in 4 KiB page-cache pages). config.json gains

    "quantization_config": {"quant_method": "qwen35", "policy": "int4", "block_size": 32,
                            "tensors": {"model.layers.0.mlp.up_proj.weight": "q4_0", ...}}

Any other `quant_method` (gptq, awq, fp8, bitsandbytes, ...) is refused with its name.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import torch

from ..errors import CheckpointError
from . import formats

METHOD = "qwen35"
WEIGHT_SUFFIXES = (".safetensors",)


def read_quant_config(path: Path) -> dict | None:
    """The checkpoint's quantization_config (ours), None when unquantized; other methods are an error."""
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # ModelConfig.from_file reports a missing or broken config.json by name
    if not isinstance(raw, dict):
        return None  # (likewise: ModelConfig.from_file says config.json is not an object)
    text = raw.get("text_config")
    q = raw.get("quantization_config") or (text.get("quantization_config") if isinstance(text, dict) else None)
    if q is None:
        return None
    method = q.get("quant_method") if isinstance(q, dict) else None
    if method != METHOD:
        raise CheckpointError(
            f"{path}: quantization_config.quant_method {method!r} is not supported: qwen35 runs unquantized "
            f"checkpoints (quantizing them at load with quant=) and its own `qwen35 quantize` output")
    tensors = q.get("tensors")
    if not isinstance(tensors, dict) or any(v not in formats.LAYOUTS for v in tensors.values()):
        raise CheckpointError(f"{path}: quantization_config.tensors must map tensor names to one of "
                              f"{', '.join(formats.LAYOUTS)}")
    block = q.get("block_size", formats.BLOCK)
    if block != formats.BLOCK or isinstance(block, bool):  # the layouts' blocks are fixed: another is not ours
        raise CheckpointError(f"{path}: quantization_config.block_size {block!r} is not supported (qwen35's "
                              f"layouts use blocks of {formats.BLOCK})")
    _check_policy(path, q.get("policy"), tensors)
    return q


def _check_policy(path: Path, name, tensors: dict) -> None:
    """The policy must be one of ours; a tensor no policy quantizes (a norm, A_log, ...) is named as such,
    before the loader would look for its .qs. The stored layouts need not be the ones today's policy would
    choose (each is checked against its tensor's shape): a checkpoint an earlier version wrote still loads."""
    from . import policy

    if name not in policy.POLICIES:
        raise CheckpointError(f"{path}: quantization_config.policy {name!r} is not one of "
                              f"{', '.join(policy.POLICIES)}")
    for t in tensors:
        if policy._kept(t):
            raise CheckpointError(f"{path}: quantization_config.tensors names '{t}', which is never quantized "
                                  f"(norms, A_log, dt_bias, conv1d and biases stay unquantized)")


def check_stored(path: Path, name: str, qs_entry, d_entry, scheme: str, N: int, K: int) -> None:
    """A stored quantized tensor must have exactly the layout its config names."""
    lay = formats.layout(scheme)
    for entry, shape, dtype in ((qs_entry, lay.qs_shape(N, K), lay.qs_dtype), (d_entry, lay.d_shape(N, K), torch.float16)):
        if tuple(entry.shape) != tuple(shape) or entry.dtype != dtype:
            raise CheckpointError(
                f"{path}: quantized tensor '{entry.name}' does not match {scheme} for a [{N}, {K}] matrix: "
                f"expected {str(dtype).removeprefix('torch.')} {list(shape)}, found "
                f"{str(entry.dtype).removeprefix('torch.')} {list(entry.shape)}")
    _check_scales(path, qs_entry, d_entry, scheme, _stamp(qs_entry.file))


def _stamp(file: Path) -> tuple[int, int]:
    st = file.stat()
    return st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=4096)  # CheckpointTensors checks a matrix again for every band it reads
def _check_scales(path: Path, qs_entry, d_entry, scheme: str, stamp: tuple[int, int]) -> None:
    """Stored scales must be finite: a NaN or inf one turns its block (and every logit after it) into garbage
    with no error. Cheap: the tensors are mapped, not read; formats.finite_scales copies out only the scales
    (d, or the 2-4 bytes a K-quant block keeps them in)."""
    import numpy as np

    def mapped(e):
        if e.nbytes == 0:
            return torch.empty(e.shape, dtype=e.dtype)
        raw = np.memmap(e.file, dtype=np.uint8, mode="r", offset=e.start, shape=(e.nbytes,))
        return torch.from_numpy(raw).view(e.dtype).view(e.shape)  # read-only map: never written

    import warnings

    with warnings.catch_warnings():  # torch warns that the map is not writable; nothing writes to it
        warnings.simplefilter("ignore", UserWarning)
        ok = formats.finite_scales(scheme, mapped(qs_entry), mapped(d_entry))
    if not ok:
        entry = qs_entry if scheme in formats.K_KIND else d_entry
        raise CheckpointError(f"{path}: quantized tensor '{entry.name}' has NaN or infinite scales: the file is "
                              f"damaged")


def stored_tensors(named_weights, policy: str, config: dict) -> dict[str, torch.Tensor]:
    """The tensors a quantized checkpoint stores (NAME.qs / NAME.d for each quantized matrix, the rest as they
    are), and its `quantization_config` set in `config`. `qwen35 quantize` and a re-quantized QLoRA merge both
    write through this, so the two files have one layout."""
    from .weight import QuantizedWeight

    tensors: dict[str, torch.Tensor] = {}
    layouts: dict[str, str] = {}
    for name, w in named_weights:
        if isinstance(w, QuantizedWeight):
            tensors[name + ".qs"], tensors[name + ".d"] = w.qs, w.d
            layouts[name] = w.scheme
        else:
            tensors[name] = w.detach()
    config["quantization_config"] = {"quant_method": METHOD, "policy": policy, "block_size": formats.BLOCK,
                                     "tensors": dict(sorted(layouts.items()))}
    return tensors


def vision_tensors(model) -> dict[str, torch.Tensor]:
    """The vision tower's tensors under the official keys (`model.visual.*`), unquantized, each in the dtype
    the checkpoint the model was loaded from stores it in (an fp32 load of a bf16 tower would double its bytes
    for nothing: the values are the file's); none for a text-only model. The tower sits outside the module
    tree (weights.attach_vision), so named_weights misses it: every writer of a VLM's checkpoint adds it
    through this, or the file would hold a text-only model (or a vision_config naming a tower it lacks)."""
    visual = getattr(model, "visual", None)
    if visual is None:
        return {}
    from ..checkpoint_index import VISION_PREFIX

    stored = _stored_dtypes(model, VISION_PREFIX)
    return {VISION_PREFIX + n: p.detach().to(stored.get(VISION_PREFIX + n, p.dtype))
            for n, p in visual.named_parameters()}


def _stored_dtypes(model, prefix: str) -> dict[str, torch.dtype]:
    """key -> dtype of the `prefix` tensors in the checkpoint `model` was loaded from (headers only); empty
    where that is not known (a model built in memory, a source moved or rewritten since: the dtypes the model
    holds then stand)."""
    from ..checkpoint_index import read_checkpoint_entries

    info = getattr(model, "checkpoint_info", None)
    if info is None:
        return {}
    try:
        entries, _ = read_checkpoint_entries(Path(info.path))
    except (OSError, CheckpointError):
        return {}
    return {k: e.dtype for k, e in entries.items() if k.startswith(prefix)}


def save_quantized(model, source: Path, out: Path, max_shard_bytes: int = 2 * 2**30) -> Path:
    """Write `model` (loaded with quant=) as a quantized checkpoint in `out`, its vision tower (if any)
    unquantized; tokenizer, template and other side files are copied from `source`."""
    from ..checkpoint import write_checkpoint

    if getattr(model, "quant", None) is None:
        raise CheckpointError("save_quantized needs a model loaded with quant=")
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    tensors = stored_tensors(model.named_weights(), model.quant, config)
    tensors.update(vision_tensors(model))  # unquantized, as quantize-at-load keeps the tower
    out = Path(out)
    write_checkpoint(tensors, config, out, max_shard_bytes)
    for f in source.iterdir():
        if f.is_file() and f.suffix not in WEIGHT_SUFFIXES and f.name not in ("config.json",
                                                                               "model.safetensors.index.json"):
            shutil.copy2(f, out / f.name)
    return out
