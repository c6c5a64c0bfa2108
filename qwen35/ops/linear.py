"""The one place a weight meets an activation: `linear(x, w)`.

`w` is either a plain matrix [N, K] (torch's matmul runs, always on 2-D inputs: torch turns a 3-D input
with a strided view into a bmm that copies the whole weight) or a *weight object*: anything with `shape`,
`dtype` and `matmul(x2, out_fp32) -> [M, N]`. Weight objects are how a weight that is not a plain matrix
runs without a branch in any model file: the AVX512-BF16 GEMV of ops/fast.py (`GemvWeight`) today, a
block-quantized weight with its own kernels next. `Linear.runtime_weight` and the fused matrices of
`fuse_linears` are where ops/fast.bind_kernels puts them.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


def linear(x: torch.Tensor, w, out_fp32: bool = False) -> torch.Tensor:
    """x [..., K] @ w[N, K]^T -> [..., N], in x's dtype (fp32 when out_fp32)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if isinstance(w, torch.Tensor):
        y = dense_linear(x2.contiguous(), w)
        if out_fp32:
            y = y.float()
    else:
        y = w.matmul(x2, out_fp32)
    return y.view(*lead, w.shape[0])


FP32_GEMM_MIN_ROWS = 16  # below it the bf16 product is memory-bound (decode, short verify passes): left as it is
FP32_BAND_BYTES = 64 << 20  # fp32 copies of at most this many bytes of a weight at a time


@functools.cache
def _bf16_native() -> bool:
    from .kernels import bf16_matmul_native

    return bf16_matmul_native()


def dense_linear(x2: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x2, w) for a plain matrix. A bf16 product of many rows (prefill) on a CPU without bf16 matrix
    instructions (most laptops: AVX2, no AVX512-BF16) runs in fp32 on the same bf16 values, a band of weight rows
    at a time, and is rounded to bf16 as torch's bf16 product is: the same products (a bf16 times a bf16 is exact
    in fp32), summed in another order, 4-7x faster there (ops/kernels.bf16_matmul_native). Not under autograd."""
    rows = x2.shape[0]
    if (rows < FP32_GEMM_MIN_ROWS or w.dtype != torch.bfloat16 or x2.dtype != torch.bfloat16
            or x2.device.type != "cpu" or torch.is_grad_enabled() or _bf16_native()):
        return F.linear(x2, w)
    xf = x2.float()
    step = max(1, FP32_BAND_BYTES // (4 * w.shape[1]))
    if w.shape[0] <= step:
        return F.linear(xf, w.float()).to(torch.bfloat16)
    out = torch.empty(rows, w.shape[0], dtype=torch.bfloat16)
    for s in range(0, w.shape[0], step):
        out[:, s : s + step] = F.linear(xf, w[s : s + step].float())
    return out


class StackedWeight:
    """Weights of different kinds stacked along N (a fused projection whose parts are quantized
    differently): one weight object whose output is the concatenation of its parts'.

    Prefill (more rows than a GEMV takes, no autograd) where it dequantizes (quant/weight.prefill_gemm): the
    parts are dequantized into one bf16 matrix and multiplied by one GEMM, as a plain fused matrix would be: a
    GEMM per part, a tiny one for the 16-row gates among them, and concatenating their outputs cost the 0.8B's
    int4 prefill ~2% (torch.profiler)."""

    def __init__(self, parts: list):
        self.parts = parts
        self.shape = torch.Size((sum(p.shape[0] for p in parts), parts[0].shape[1]))
        self.dtype = parts[0].dtype

    def matmul(self, x2: torch.Tensor, out_fp32: bool) -> torch.Tensor:
        from ..quant.weight import (
            BAND_BYTES,
            GEMV_MAX_ROWS,
            PANEL_MAX_ROWS,
            QuantizedWeight,
            kept,
            panels,
            prefill_gemm,
        )

        rows = x2.shape[0]
        # (up to PANEL_MAX_ROWS on AMX each quantized part runs the panel kernel, which never dequantizes it whole)
        if (rows > GEMV_MAX_ROWS and x2.dtype == torch.bfloat16 and not torch.is_grad_enabled()
                and (rows > PANEL_MAX_ROWS or not panels())
                and self.shape.numel() * 2 <= BAND_BYTES
                and all(prefill_gemm(rows, p.scheme) == "dequantize"
                        for p in self.parts if isinstance(p, QuantizedWeight))):
            w = kept(self, torch.bfloat16, self._dense)
            y = dense_linear(x2.contiguous(), self._dense() if w is None else w)
            return y.float() if out_fp32 else y
        return torch.cat([linear(x2, p, out_fp32) for p in self.parts], dim=-1)

    def _dense(self) -> torch.Tensor:
        """The parts as one bf16 matrix [N, K], each dequantized (or copied) straight into its rows."""
        from ..quant.weight import QuantizedWeight

        out = torch.empty(self.shape, dtype=torch.bfloat16)
        row = 0
        for p in self.parts:
            n = p.shape[0]
            if isinstance(p, QuantizedWeight):
                p.dequantize(torch.bfloat16, out=out[row : row + n])
            else:
                out[row : row + n].copy_(matrix(p))
            row += n
        return out


def embedding(ids: torch.Tensor, w) -> torch.Tensor:
    """Rows `ids` of a table: a plain matrix, or a weight object with `rows(ids, dtype)`."""
    if isinstance(w, torch.Tensor):
        return F.embedding(ids, w)
    return w.rows(ids, w.dtype)


class Embedding(nn.Embedding):
    """nn.Embedding (same parameter name) whose table may be a weight object (a quantized tied head)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return embedding(ids, self.weight)


def matrix(w) -> torch.Tensor:
    """The plain matrix behind `w` (a tensor, or a weight object wrapping one as `.weight`)."""
    return w if isinstance(w, torch.Tensor) else w.weight


class Linear(nn.Linear):
    """nn.Linear (same parameter names, no bias) whose forward goes through `linear`.

    runtime_weight: None (use `weight`) or a weight object bound for inference by ops/fast.bind_kernels."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.runtime_weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.runtime_weight is None or torch.is_grad_enabled():
            return linear(x, self.weight)
        return linear(x, self.runtime_weight)


def fuse_linears(*layers: nn.Linear) -> torch.Tensor:
    """Concatenate the weights of linears that read the same input into one matrix, and make each
    layer's weight a view of it: one weight stream (one kernel call) instead of several, no extra memory,
    and the parameters keep their names and values."""
    fused = torch.cat([layer.weight.detach() for layer in layers], dim=0)
    view_linears(fused, *layers)
    return fused


def view_linears(fused: torch.Tensor, *layers: nn.Linear) -> None:
    """Make each layer's weight the matching row block of `fused`."""
    offset = 0
    for layer in layers:
        n = layer.weight.shape[0]
        layer.weight = nn.Parameter(fused[offset : offset + n], requires_grad=layer.weight.requires_grad)
        offset += n


def unfuse_linears(*layers: nn.Linear) -> None:
    """Give each layer a weight of its own again (a copy: the fused matrix can then be dropped)."""
    for layer in layers:
        layer.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=layer.weight.requires_grad)
