"""Load a `qwen35` GGUF (one file or a split) into a Qwen35ForCausalLM: `load_model("model.gguf")` lands here.

Tensor by tensor, into the storage placement.allocate gives each parameter (the same arena, fused groups and
weight objects as a checkpoint directory):
- Q8_0 / Q4_0 matrices are our q8_0 / q4_0 layouts value for value: their blocks are split into (qs, d)
  and run on our kernels as they are, never requantized (rows and block-aligned columns that llama.cpp
  reordered are moved back on the packed form);
- F32 / F16 / BF16 tensors are read as they are and cast to the model dtype (norms, A_log, dt_bias: fp32);
- any other type (Q4_1, Q5_x, K-quants, ...) is dequantized by the gguf package and cast to the model dtype:
  no kernel of ours runs it yet, so it costs its float size in memory (a warning says which).
llama.cpp's layout transforms are undone exactly (names.py). With quant=, float tensors are quantized at
load as for a checkpoint directory; a GGUF that is already quantized is refused.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import CheckpointError
from . import blocks, names
from .metadata import config_dict
from .reader import FLOAT_TYPES, open_gguf, to_torch

log = logging.getLogger("qwen35")


def read_config(path: str | Path) -> ModelConfig:
    f = open_gguf(path)
    return ModelConfig.from_hf(config_dict(f), source=str(f.path))


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, progress: bool = False,
              kernels: bool | None = None, quant: str | None = None):
    from ..model.qwen35 import Qwen35ForCausalLM
    from ..ops.fast import bind_kernels
    from ..placement import allocate, quantize_into
    from ..weights import CheckpointInfo, _skip_init

    f = open_gguf(path)
    config = ModelConfig.from_hf(config_dict(f), source=str(f.path))
    L = config.num_hidden_layers
    with torch.device("meta"), _skip_init():
        model = Qwen35ForCausalLM(config, mtp_layers=config.mtp_num_hidden_layers)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}

    by_name = {}
    for gname, t in f.tensors.items():
        n = names.our_name(gname, L)
        if n is None or n not in shapes:
            raise CheckpointError(f"{f.path}: unexpected tensor '{gname}' for a qwen35 model with {L} layers"
                                  f"{' and an MTP head' if config.mtp_num_hidden_layers else ''}")
        by_name[n] = t
    missing = [n for n in shapes if n not in by_name]
    if missing:
        raise CheckpointError(f"{f.path}: missing tensor '{names.gguf_name(missing[0], L)}'"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for n, t in by_name.items():
        want = _gguf_shape(n, shapes[n])
        got = tuple(int(s) for s in reversed(t.shape.tolist()))
        if got != want:
            raise CheckpointError(f"{f.path}: tensor '{t.name}' has shape {list(reversed(got))} (GGUF order), "
                                  f"the metadata implies {list(reversed(want))}")

    native = {n: s for n, t in by_name.items() if (s := _native(n, t, shapes[n], config))}
    plan = dict(native)
    if quant is not None:
        from ..quant import policy

        plan = policy.plan(quant, shapes, config.tie_word_embeddings)
        if native and native != plan:  # quant= naming what the file already holds is fine
            raise CheckpointError(f"{f.path} is already quantized ({', '.join(sorted(set(native.values())))}); "
                                  f"load it without quant=")
    converted = Counter(t.tensor_type.name for n, t in by_name.items()
                        if n not in native and t.tensor_type not in FLOAT_TYPES)
    if converted:
        what = ", ".join(f"{c} {k} tensors" for k, c in sorted(converted.items()))
        log.warning("%s: %s dequantized to %s (no qwen35 kernel for these types yet)", f.path.name, what,
                    str(dtype).removeprefix("torch."))

    sinks = allocate(model, dtype, plan)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=f.nbytes, unit="B", unit_scale=True, desc=f"loading {f.path.name}", leave=False)
    try:
        for n, sink in sinks.items():
            t = by_name[n]
            if n in native:
                qw, row, rows = sink
                if names.row_index(n, config) is None and names.col_index(n, config) is None:
                    blocks.split_into(t.data, native[n], qw.qs[row : row + rows], qw.d[row : row + rows])
                else:  # value heads to move back first
                    qs, d = _native_blocks(n, t, native[n], shapes[n], config)
                    qw.qs[row : row + rows] = qs
                    qw.d[row : row + rows] = d
            else:
                w = names.from_gguf(n, to_torch(t, f.path), config, shapes[n])
                if isinstance(sink, torch.Tensor):
                    sink.copy_(w)
                else:
                    quantize_into(sink, lambda a, b, w=w: w[a:b])
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


def _gguf_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[0], shape[-1]) if name.endswith("conv1d.weight") else shape


def _native(name: str, t, shape: tuple[int, ...], config: ModelConfig) -> str | None:
    """Our layout for a GGUF tensor that can run as it is, or None (it is converted)."""
    scheme = blocks.SCHEMES.get(t.tensor_type.name)
    if scheme is None or len(shape) != 2 or name.endswith("conv1d.weight"):
        return None
    if name == "model.embed_tokens.weight" and not config.tie_word_embeddings:
        return None  # an untied embedding is only looked up: kept as a plain matrix, like quant= does
    cols = names.col_index(name, config)
    if cols is not None and blocks.block_order(names.inverse(cols)) is None:
        return None
    return scheme


def _native_blocks(name: str, t, scheme: str, shape: tuple[int, int], config: ModelConfig):
    N, K = shape
    qs, d = blocks.split_blocks(t.data, scheme, N, K)
    rows = names.row_index(name, config)
    if rows is not None:
        inv = names.inverse(rows)
        qs, d = qs[inv], d[inv]
    cols = names.col_index(name, config)
    if cols is not None:
        qs, d = blocks.permute_blocks(qs, d, scheme, blocks.block_order(names.inverse(cols)))
    return qs, d
