"""The two RMSNorms of Qwen3.5. They differ, and mixing them up is a classic silent bug.

- `RMSNorm` (every layer norm, q/k norm, final norm, MTP norms) is zero-centred: it scales by (1 + w),
  and the checkpoint stores w around 0. The +1 is applied here and only here.
- `GatedRMSNorm` (Gated DeltaNet output) scales by w directly (stored around 1) and multiplies by
  silu(gate).
Both compute in fp32 and keep their weight in fp32 (a few KB; checkpoints ship some of them as F32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_reference(x, self.weight, self.eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * (1.0 + weight.float())).to(x.dtype)


class GatedRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float() * F.silu(gate.float())).to(out_dtype or x.dtype)
