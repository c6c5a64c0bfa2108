"""Write a loaded model as a GGUF file llama.cpp loads: architecture `qwen35`, its tensor names, metadata
keys and layout transforms (names.py), the tokenizer and chat template, and the MTP head as `blk.{L}.nextn.*`.

Tensor types per file type, as llama.cpp's converter and quantizer choose them: 1-D tensors, norms, conv1d,
ssm_a and ssm_dt.bias are F32 always; the matrices are BF16 (`bf16`) or, for `q8_0` / `q4_0` / `q4_k_m`, the
layout our quantization policy of that name (`int4` for q4_k_m: Q4_K, Q6_K and Q8_0 tensors) gives them (quant/policy.py: the same tensors `load_model(quant=...)`
quantizes; an untied embedding stays BF16). A matrix the model already holds in that layout is written from
its own bytes; any other is quantized here with quantize_fast (GGUF-exact bytes), so export -> import gives
back exactly the model that `quant=` would have loaded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError
from . import blocks, names, vocab
from .metadata import ARCH, write_config

log = logging.getLogger("qwen35")
FILE_TYPES = {"f32": 0, "bf16": 32, "q8_0": 7, "q4_0": 2, "q4_k_m": 15}  # llama.cpp's LlamaFileType values
EXPORT_TYPES = tuple(FILE_TYPES)
# the quantization policy (quant/policy.py) each quantized file type writes; q4_k_m is our `int4` (K-quants with
# llama.cpp's Q4_K_M choice of 6-bit tensors), the file type llama.cpp names that mix
POLICY = {"q8_0": "q8_0", "q4_0": "q4_0", "q4_k_m": "int4"}
# `qwen35 export --type` also takes the policy names `--quant` uses elsewhere, for the file type writing them
TYPE_ALIASES = {"int8": "q8_0", "int4": "q4_k_m"}


def kept_f32(name: str, shape: tuple[int, ...]) -> bool:
    """Tensors llama.cpp keeps in F32 whatever the file type: 1-D ones, norms and the conv kernels."""
    return len(shape) <= 1 or "norm" in name.rsplit(".", 2)[-2] or name.endswith("conv1d.weight")


def tensor_plan(config, shapes: dict[str, tuple[int, ...]], file_type: str) -> list[tuple[str, str, str]]:
    """(our name, llama.cpp name, GGML type name) of every tensor a `file_type` export of a model with these
    parameter shapes writes, in llama.cpp's order. export_gguf follows it; tests check it against llama.cpp's
    files without building the weights."""
    from ..quant import policy

    if file_type not in FILE_TYPES:
        raise CheckpointError(f"unknown GGUF type {file_type!r}; use one of {', '.join(FILE_TYPES)}")
    plan = policy.plan(POLICY[file_type], shapes, config.tie_word_embeddings) if file_type in POLICY else {}
    out = []
    for n in _order(shapes, config.num_hidden_layers):
        if n in plan:
            kind = blocks.GGUF_TYPES[plan[n]]
        elif kept_f32(n, shapes[n]) or file_type == "f32":
            kind = "F32"
        else:
            kind = "BF16"
        out.append((n, names.gguf_name(n, config.num_hidden_layers), kind))
    return out


def export_gguf(model, out: str | Path, file_type: str = "bf16", mtp: bool = True,
                tokenizer_from: Path | None = None, gguf_source=None, name: str | None = None,
                split_max_bytes: int = 0, progress: bool = False) -> list[Path]:
    """Write `model` to `out` (.gguf). tokenizer_from: the checkpoint directory whose tokenizer files go in;
    gguf_source: an opened GGUF (reader.open_gguf) whose tokenizer.* fields are copied instead; neither given:
    what the model was loaded from (a directory's tokenizer.json, a GGUF's tokenizer metadata), when it holds
    a tokenizer, else none (a warning says so). split_max_bytes: split into
    `-0000K-of-0000N.gguf` parts of at most this size (0: one file). Each file is written under a temporary
    name beside it and renamed over `out` only when complete, so a failure leaves what was there before
    (an OSError becomes a Qwen35Error naming the file). Returns the files written."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.utility import size_label

    from ..quant.formats import quantize_fast
    from ..quant.weight import QuantizedWeight

    config = model.config
    if getattr(model, "visual", None) is not None:  # llama.cpp keeps the tower in a file of its own
        log.info("the GGUF holds the text model; the vision tower goes to its own mmproj file (export_mmproj)")
    mtp_layers = len(model.mtp.layers) if (mtp and model.mtp is not None) else 0
    weights = dict(model.named_weights())
    if not mtp_layers:
        weights = {n: w for n, w in weights.items() if not n.startswith("mtp.")}
    shapes = {n: tuple(w.shape) for n, w in weights.items()}
    tensors = tensor_plan(config, shapes, file_type)

    out = Path(out)
    w = GGUFWriter(None, ARCH, split_max_size=split_max_bytes)  # no file yet: _write names the temporary ones
    w.add_type("model")
    w.add_name(name or out.stem)
    n_params = sum(int(np.prod(s)) for s in shapes.values())  # as llama.cpp counts: every tensor written
    w.add_size_label(size_label(n_params, 0, 0, 0))
    write_config(w, config, mtp_layers)
    w.add_file_type(FILE_TYPES[file_type])
    w.add_quantization_version(2)
    if gguf_source is None and tokenizer_from is None:
        tokenizer_from, gguf_source = _own_tokenizer(model)
    if gguf_source is not None:
        vocab.copy_tokenizer(w, gguf_source)
    elif tokenizer_from is not None:
        vocab.write_tokenizer(w, Path(tokenizer_from), config.vocab_size)
    else:
        log.warning("exporting %s without a tokenizer: no tokenizer source given", out)

    requantized = 0
    for n, gname, kind in tensors:
        wt = weights[n]
        scheme = blocks.SCHEMES.get(kind)
        if scheme is not None:
            if isinstance(wt, QuantizedWeight) and wt.scheme == scheme:
                qs, d = wt.qs, wt.d
            else:
                requantized += isinstance(wt, QuantizedWeight)
                qs, d = quantize_fast(scheme, _dense(wt))
            qs, d = _gguf_blocks(n, qs, d, scheme, config)
            if qs is None:  # column order not block-aligned: quantize llama.cpp's layout itself
                qs, d = quantize_fast(scheme, names.to_gguf(n, _dense(wt), config))
            w.add_tensor(gname, blocks.join_blocks(qs, d, scheme), raw_dtype=GGMLQuantizationType[kind])
            continue
        t = names.to_gguf(n, _dense(wt), config)
        if kind == "F32":
            w.add_tensor(gname, t.float().numpy())
        else:
            w.add_tensor(gname, t.to(torch.bfloat16).contiguous().view(torch.int16).numpy(),
                         raw_dtype=GGMLQuantizationType.BF16)
    if requantized:
        log.warning("%d quantized matrices of the model were in another layout and were requantized to %s",
                    requantized, file_type)
    return _write(w, out, progress)


def _own_tokenizer(model):
    """(tokenizer_from, gguf_source) defaults: where the model was loaded from, when that holds a tokenizer
    (a checkpoint directory's tokenizer.json, a GGUF's tokenizer metadata); else (None, None)."""
    from .reader import open_gguf

    path = getattr(getattr(model, "checkpoint_info", None), "path", None)
    if path is None:
        return None, None
    path = Path(path)
    if path.is_dir():
        return (path, None) if (path / "tokenizer.json").is_file() else (None, None)
    if getattr(model.checkpoint_info, "layout", None) == "gguf" and path.is_file():
        try:
            f = open_gguf(path)
        except CheckpointError:  # changed on disk since it was loaded: export without, as for no source
            return None, None
        return None, (f if f.get("tokenizer.ggml.model") is not None else None)
    return None, None


def _write(w, out: Path, progress: bool) -> list[Path]:
    """Write every file of `w` under a temporary name in its own folder, then rename each over its final
    name: a full disk, a crash or Ctrl-C part-way leaves the previous file (even the source of a GGUF
    re-exported onto itself) and no temporary behind."""
    import os
    import secrets

    from ..errors import Qwen35Error

    # a hidden name in the same folder (os.replace is atomic only within one filesystem); the split parts'
    # temporaries are that name's parts, so each maps to its final name by position
    tmp = out.with_name(f".{out.stem}.{secrets.token_hex(4)}.tmp.gguf")
    finals, temps = w.format_shard_names(out), w.format_shard_names(tmp)
    replaced = 0
    try:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=progress)
        for f in w.fout:
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the file at its final name
        w.close()
        for t, f in zip(temps, finals):
            os.replace(t, f)
            replaced += 1
    except BaseException as e:
        try:
            w.close()
        except OSError:
            pass  # closing a file on a full disk fails again; it is removed below either way
        for t in temps:
            t.unlink(missing_ok=True)
        if isinstance(e, OSError):  # a full disk, a file-size limit, no permission: said, not a traceback
            reason = e.strerror or str(e)
            if e.errno is None and "written" in reason:  # numpy's short write ("N requested and M written")
                reason += ": the disk is full or the file size limit was reached"
            kept = "no file was changed" if not replaced else f"{replaced} of its {len(finals)} parts were replaced"
            raise Qwen35Error(f"{out}: could not write the GGUF file ({reason}); {kept}") from e
        raise
    return finals


def _dense(wt) -> torch.Tensor:
    from ..quant.weight import QuantizedWeight

    return wt.dequantize(torch.float32) if isinstance(wt, QuantizedWeight) else wt.detach()


def _gguf_blocks(name: str, qs, d, scheme: str, config):
    rows = names.row_index(name, config)
    if rows is not None:
        qs, d = qs[rows], d[rows]
    cols = names.col_index(name, config)
    if cols is not None:
        from ..quant import formats

        order = blocks.block_order(cols, formats.layout(scheme).block)
        if order is None:
            return None, None
        qs, d = blocks.permute_blocks(qs, d, scheme, order)
    return qs, d


def _order(weights: dict, L: int) -> list[str]:
    """llama.cpp's order: embedding, layers, output norm and head, then the MTP block."""
    def key(n: str):
        if n == "model.embed_tokens.weight":
            return (0, 0, n)
        if n.startswith("model.layers."):
            return (1, int(n.split(".")[2]), n)
        if n.startswith("mtp."):
            return (3, 0, n)
        return (2, 0, n)

    return sorted(weights, key=key)
