"""Where each weight of a model being loaded lives: one WeightArena (huge pages where available) holding
plain matrices, the fused matrices of projections that share an input (their parameters are views), and the
packed bytes and scales of quantized weights (QuantizedWeight objects in place of parameters). Split from
weights.py, which finds and reads checkpoints; this decides the memory they are read into.
"""

from __future__ import annotations

import torch
from torch import nn

from .model.qwen35 import Qwen35ForCausalLM, keeps_fp32
from .ops.linear import view_linears
from .runtime import WeightArena

QUANT_BAND_BYTES = 16 * 2**20  # bf16 bytes of rows read and quantized at once (one band, never the whole matrix)


def allocate(model: Qwen35ForCausalLM, dtype: torch.dtype, plan: dict[str, str]) -> dict:
    """Give every parameter real storage, all of it in one WeightArena (huge pages where available), so
    the checkpoint is read straight into place (no second copy, ever). Projections that share an input get
    one real matrix each, their weights views of it. Parameters in `plan` become QuantizedWeights (packed
    bytes and scales in the arena too); a fused group whose parts are quantized differently becomes a
    StackedWeight of its runs. Returns {parameter name: where its checkpoint tensor goes}: a tensor to read
    into, or (QuantizedWeight, first row) to quantize into."""
    from .ops.linear import StackedWeight

    groups = model.fusion_groups()
    name_of = {id(p): n for n, p in model.named_parameters()}
    members = {id(layer.weight) for _, _, linears in groups for layer in linears}

    def runs(names, linears):  # consecutive members with the same scheme share one matrix
        out = []
        for n, lin in zip(names, linears):
            if out and out[-1][0] == plan.get(n):
                out[-1][1].append((n, lin))
            else:
                out.append((plan.get(n), [(n, lin)]))
        return out

    def need(scheme, N, K, d):
        if scheme is None:
            return [((N, K), d)]
        from .quant import formats

        lay = formats.layout(scheme)
        return [(lay.qs_shape(N, K), lay.qs_dtype), (lay.d_shape(N, K), torch.float16)]

    group_runs = []
    requests = []
    for owner, attr, linears in groups:
        rs = runs([name_of[id(lin.weight)] for lin in linears], linears)
        group_runs.append((owner, attr, rs))
        for scheme, items in rs:
            requests += need(scheme, sum(lin.weight.shape[0] for _, lin in items), items[0][1].weight.shape[1], dtype)
    singles = [(name, tuple(p.shape), torch.float32 if keeps_fp32(name) else dtype)
               for name, p in model.named_parameters() if id(p) not in members]
    for name, shape, d in singles:
        requests += need(plan.get(name), *shape, d) if len(shape) == 2 else [(shape, d)]
    arena = WeightArena(WeightArena.size_of(requests))

    def take(scheme, N, K):
        if scheme is None:
            return arena.take((N, K), dtype)
        from .quant import QuantizedWeight, formats

        lay = formats.layout(scheme)
        qw = QuantizedWeight(scheme, arena.take(lay.qs_shape(N, K), lay.qs_dtype),
                             arena.take(lay.d_shape(N, K), torch.float16), K)
        qw.dtype = dtype
        return qw

    sinks: dict = {}
    for owner, attr, rs in group_runs:
        parts = []
        for scheme, items in rs:
            N, K = sum(lin.weight.shape[0] for _, lin in items), items[0][1].weight.shape[1]
            whole = take(scheme, N, K)
            parts.append(whole)
            row = 0
            for name, lin in items:
                n = lin.weight.shape[0]
                if scheme is None:
                    sinks[name] = whole[row : row + n]
                    _set_param(model, name, sinks[name])
                else:
                    sinks[name] = (whole, row, n)
                    _set_weight(model, name, whole.slice(row, row + n))
                row += n
        setattr(owner, attr, parts[0] if len(parts) == 1 else StackedWeight(parts))
    for name, shape, d in singles:
        scheme = plan.get(name)
        if scheme is None:
            sinks[name] = arena.take(shape, d)
            _set_param(model, name, sinks[name])
        else:
            qw = take(scheme, *shape)
            sinks[name] = (qw, 0, shape[0])
            _set_weight(model, name, qw)
    return sinks


def quantize_into(sink, rows) -> None:
    """Quantize a matrix into its sink (QuantizedWeight, first row, rows) band by band; rows(a, b) gives
    rows a..b-1 of the source matrix (read from the checkpoint as they are asked for)."""
    qw, row, n = sink
    from .quant import formats

    band = max(1, QUANT_BAND_BYTES // (2 * qw.shape[1]))
    for a in range(0, n, band):
        qs, d = formats.quantize_fast(qw.scheme, rows(a, min(a + band, n)))
        qw.qs[row + a : row + a + qs.shape[0]] = qs
        qw.d[row + a : row + a + qs.shape[0]] = d


def _set_weight(model: nn.Module, name: str, w) -> None:
    """Put a weight object where parameter `name` was (it is no longer a parameter)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters.pop(attr, None)
    setattr(module, attr, w)


def _set_param(model: nn.Module, name: str, data: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[attr] = nn.Parameter(data, requires_grad=False)
