"""Load a `qwen35` GGUF (one file or a split) into a Qwen35ForCausalLM: `load_model("model.gguf")` lands here.

Tensor by tensor, into the storage placement.allocate gives each parameter (the same arena, fused groups and
weight objects as a checkpoint directory):
- Q8_0 / Q4_0 / Q4_K / Q6_K matrices are our q8_0 / q4_0 / q4_k / q6_k layouts value for value: Q8_0 / Q4_0
  blocks are split into (qs, d), K-quant rows copied as they are, and they run on our kernels, never
  requantized (rows and block-aligned columns that llama.cpp reordered are moved back on the packed form);
- F32 / BF16 tensors are read as they are, F16 ones cast to the model dtype (norms, A_log, dt_bias: fp32);
- any other quantized matrix (Q4_1, Q5_0, Q5_1, Q5_K, Q2_K, Q3_K, ...; or a K-quant out_proj whose value-head
  column reorder splits super-blocks) is converted to q8_0: dequantized by the gguf package a band of rows
  at a time and requantized, so it runs on the int8 kernels. That costs 8.5 bits per weight instead of its
  5-6 (the file's 4-bit types are not requantized to 4 bits: that would round twice), and the 8-bit rounding
  on top of the file's own is ~10x smaller than it (measured: README "GGUF"); a warning says which tensors;
- other quantized tensors (an untied embedding, only ever looked up) are dequantized to the model dtype.
llama.cpp's layout transforms are undone exactly (names.py). With quant=, float tensors are quantized at
load as for a checkpoint directory; a GGUF that is already quantized is refused.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from gguf.quants import dequantize

from ..config import ModelConfig
from ..errors import CheckpointError
from ..quant import formats
from . import blocks, names
from .metadata import config_dict
from .reader import FLOAT_TYPES, copy_float_into, open_gguf, release, to_torch

log = logging.getLogger("qwen35")
CONVERT_TO = "q8_0"  # the layout quantized types without a kernel of ours are converted to (None: dequantized)


def read_config(path: str | Path) -> ModelConfig:
    f = open_gguf(path)
    return ModelConfig.from_hf(config_dict(f), source=str(f.path))


def quant_plan(config, shapes: dict, by_name: dict, quant: str | None) -> tuple[dict, dict, dict, str | None]:
    """What the load keeps quantized, and how, for a GGUF's tensors `by_name` (_match): (the matrices kept in
    the file's layout, those converted to CONVERT_TO, the layout of every matrix kept quantized, the file's
    quantized types where quant= conflicts with them, else None). Without quant= the file's own matrices (as
    they are, or converted); with it, the policy's, which a file already quantized otherwise refuses (quant=
    naming what the file already holds is fine). The CLI asks it too, to refuse --quant in the flag's words
    before loading."""
    native = {n: s for n, t in by_name.items() if (s := _native(n, t, shapes[n], config))}
    converted = {n: CONVERT_TO for n, t in by_name.items() if CONVERT_TO and n not in native
                 and t.tensor_type not in FLOAT_TYPES and _convertible(n, shapes[n], config)}
    plan, held = {**native, **converted}, None
    if quant is not None:
        from ..quant import policy

        wanted = policy.plan(quant, shapes, config.tie_word_embeddings)
        if plan and (converted or plan != wanted):
            held = ", ".join(sorted({by_name[n].tensor_type.name for n in plan}))
        plan = wanted
    return native, converted, plan, held


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, progress: bool = False,
              kernels: bool | None = None, quant: str | None = None):
    from ..checkpoint_index import CheckpointInfo, meta_model
    from ..ops.fast import bind_kernels
    from ..placement import allocate, quantize_into
    from ..weights import check_finite

    f = open_gguf(path)
    config = ModelConfig.from_hf(config_dict(f), source=str(f.path))
    L = config.num_hidden_layers
    model = meta_model(config, config.mtp_num_hidden_layers)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}

    by_name, problems = _match(f, config, shapes)
    if problems:
        raise CheckpointError(f"{f.path}: {problems[0]}"
                              + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""))

    native, converted, plan, held = quant_plan(config, shapes, by_name, quant)
    if held:
        raise CheckpointError(f"{f.path} is already quantized ({held}); load it without quant=")
    for what, why, kinds in (
            ("converted to q8_0", "no qwen35 kernel runs these as they are", converted),
            ("dequantized to " + str(dtype).removeprefix("torch."), "only looked up (an untied embedding), or no quantized layout fits",
             [n for n, t in by_name.items() if n not in plan and t.tensor_type not in FLOAT_TYPES])):
        count = Counter(by_name[n].tensor_type.name for n in kinds)
        if count:
            log.warning("%s: %s %s (%s)", f.path.name, ", ".join(f"{c} {k} tensors" for k, c in sorted(count.items())),
                        what, why)

    sinks = allocate(model, dtype, plan)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=f.nbytes, unit="B", unit_scale=True, desc=f"loading {f.path.name}", leave=False,
                   disable=None)  # None: not drawn where stderr is no terminal (a log)
    try:
        for n, sink in sinks.items():
            t = by_name[n]
            if n in converted:
                def band(a, b, n=n, t=t):
                    w = _float_rows(n, t, a, b, config)
                    check_finite(f.path, t.name, w)  # (a NaN or infinite block scale dequantizes to these too)
                    return w

                quantize_into(sink, band)
            elif n in native:
                qw, row, rows = sink
                if names.row_index(n, config) is None and names.col_index(n, config) is None:
                    blocks.split_into(t.data, native[n], qw.qs[row : row + rows], qw.d[row : row + rows])
                else:  # value heads to move back first
                    qs, d = _native_blocks(n, t, native[n], shapes[n], config)
                    qw.qs[row : row + rows] = qs
                    qw.d[row : row + rows] = d
                if not formats.finite_scales(native[n], qw.qs[row : row + rows], qw.d[row : row + rows]):
                    raise CheckpointError(f"{f.path}: tensor '{t.name}' has NaN or infinite block scales: the file "
                                          "is corrupt")
            elif isinstance(sink, torch.Tensor) and t.tensor_type in FLOAT_TYPES and _as_is(n, config):
                copy_float_into(t, sink)  # most tensors: straight from the map, no intermediate copy
                check_finite(f.path, t.name, sink)
            else:
                w = names.from_gguf(n, to_torch(t, f.path), config, shapes[n])
                check_finite(f.path, t.name, w)
                if isinstance(sink, torch.Tensor):
                    sink.copy_(w)
                else:
                    quantize_into(sink, lambda a, b, w=w: w[a:b])
            release(t)
            if bar is not None:
                bar.update(t.n_bytes)
    finally:
        if bar is not None:
            bar.close()
    model.eval()
    model.requires_grad_(False)
    model.checkpoint_info = CheckpointInfo(path=f.path, files=f.parts, layout="gguf", nbytes=f.nbytes)
    kinds = set(plan.values())
    model.quant = quant if quant is not None else (kinds.pop() if len(kinds) == 1 else ("gguf" if kinds else None))
    bind_kernels(model, kernels)
    return model


def _match(f, config: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> tuple[dict, list[str]]:
    """The file's tensors by our parameter name, and every way they differ from what the config implies
    (unexpected names, missing tensors, shapes)."""
    L = config.num_hidden_layers
    by_name, problems = {}, []
    for gname, t in f.tensors.items():
        n = names.our_name(gname, L)
        if n is None or n not in shapes:
            problems.append(f"unexpected tensor '{gname}' for a qwen35 model with {L} layers"
                            f"{' and an MTP head' if config.mtp_num_hidden_layers else ''}")
        else:
            by_name[n] = t
    missing = [n for n in shapes if n not in by_name]
    if missing:
        problems.append(f"missing tensor '{names.gguf_name(missing[0], L)}'"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for n, t in by_name.items():
        want = _gguf_shape(n, shapes[n])
        got = tuple(int(s) for s in reversed(t.shape.tolist()))
        if got != want:
            problems.append(f"tensor '{t.name}' has shape {list(reversed(got))} (GGUF order), the metadata "
                            f"implies {list(reversed(want))}")
    return by_name, problems


def check_tensors(f) -> list[str]:
    """`qwen35 verify`'s shape check of an opened GGUF: what _match finds against its own metadata."""
    from ..checkpoint_index import parameter_shapes

    config = ModelConfig.from_hf(config_dict(f), source=str(f.path))
    return _match(f, config, parameter_shapes(config, config.mtp_num_hidden_layers))[1]


def _gguf_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[0], shape[-1]) if name.endswith("conv1d.weight") else shape


def _native(name: str, t, shape: tuple[int, ...], config: ModelConfig) -> str | None:
    """Our layout for a GGUF tensor that can run as it is, or None (it is converted)."""
    scheme = blocks.SCHEMES.get(t.tensor_type.name)
    if scheme is None or not _convertible(name, shape, config):
        return None
    cols = names.col_index(name, config)
    if cols is not None and blocks.block_order(names.inverse(cols), formats.layout(scheme).block) is None:
        return None
    return scheme


def _as_is(name: str, config: ModelConfig) -> bool:
    """A tensor whose values and element order are ours as they are (no reorder, no +1, no -exp)."""
    return (names.row_index(name, config) is None and names.col_index(name, config) is None
            and not name.endswith("A_log") and not names.is_centred_norm(name))


def _convertible(name: str, shape: tuple[int, ...], config: ModelConfig) -> bool:
    """A matrix that can hold a quantized layout (K a multiple of 32; not conv1d; not an untied embedding,
    which is only looked up: kept as a plain matrix, as quant= does)."""
    if len(shape) != 2 or name.endswith("conv1d.weight") or shape[1] % formats.BLOCK:
        return False
    return not (name == "model.embed_tokens.weight" and not config.tie_word_embeddings)


def _float_rows(name: str, t, a: int, b: int, config: ModelConfig) -> torch.Tensor:
    """Rows a..b-1 of our matrix `name`, dequantized (fp32) from the GGUF tensor `t` (value heads moved back)."""
    rows = names.row_index(name, config)
    idx = slice(a, b) if rows is None else names.inverse(rows)[a:b].numpy()
    raw = t.data[idx]
    w = torch.from_numpy(dequantize(np.ascontiguousarray(raw), t.tensor_type).astype(np.float32, copy=False))
    cols = names.col_index(name, config)
    return w if cols is None else w[:, names.inverse(cols)]


def _native_blocks(name: str, t, scheme: str, shape: tuple[int, int], config: ModelConfig):
    N, K = shape
    qs, d = blocks.split_blocks(t.data, scheme, N, K)
    rows = names.row_index(name, config)
    if rows is not None:
        inv = names.inverse(rows)
        qs, d = qs[inv], d[inv]
    cols = names.col_index(name, config)
    if cols is not None:
        order = blocks.block_order(names.inverse(cols), formats.layout(scheme).block)
        qs, d = blocks.permute_blocks(qs, d, scheme, order)
    return qs, d
