"""The one dispatcher for matrix products with weights: `linear(x, w)`.

Decode multiplies a handful of rows by every weight matrix, so its speed is how fast weights stream
from memory. With bf16 weights and few rows, the hand-written AVX512-BF16 kernel (ops/kernels) reads
them at memory speed; otherwise (prefill, fp32/fp16 models, no kernel) torch's matmul runs, always on
2-D inputs (torch turns a 3-D input with a strided view into a bmm that copies the whole weight).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dispatch import fast_path_ok

GEMV_MAX_ROWS = 8  # beyond this, torch's GEMM (compute-bound, oneDNN) wins


def _use_gemv(x2: torch.Tensor, w: torch.Tensor) -> bool:
    return (x2.shape[0] <= GEMV_MAX_ROWS and w.dtype == torch.bfloat16 and w.is_contiguous()
            and fast_path_ok(x2, (torch.bfloat16,)))


def linear(x: torch.Tensor, w: torch.Tensor, out_fp32: bool = False) -> torch.Tensor:
    """x [..., K] @ w[N, K]^T -> [..., N], in x's dtype (fp32 when out_fp32)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if _use_gemv(x2, w):
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        y = torch.ops.qwen35.gemv_bf16(x2, w, out_fp32)
    else:
        y = F.linear(x2.contiguous(), w)
        if out_fp32:
            y = y.float()
    return y.view(*lead, w.shape[0])


class Linear(nn.Linear):
    """nn.Linear (same parameter names, no bias) whose forward goes through `linear`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


def fuse_linears(*layers: nn.Linear) -> torch.Tensor:
    """Concatenate the weights of linears that read the same input into one matrix, and make each
    layer's weight a view of it: one weight stream (one kernel call) instead of several, no extra memory,
    and the parameters keep their names and values."""
    fused = torch.cat([layer.weight.detach() for layer in layers], dim=0)
    offset = 0
    for layer in layers:
        n = layer.weight.shape[0]
        layer.weight = nn.Parameter(fused[offset : offset + n], requires_grad=layer.weight.requires_grad)
        offset += n
    return fused


def fused_weight(fused: torch.Tensor | None, *layers: nn.Linear) -> torch.Tensor | None:
    """`fused` if the layers' weights are still its views (a later .to() or load would break that), and
    not while training them: autograd must see each parameter, not the matrix they are views of."""
    if fused is None or layers[0].weight.data_ptr() != fused.data_ptr():
        return None
    if torch.is_grad_enabled() and layers[0].weight.requires_grad:
        return None
    return fused
