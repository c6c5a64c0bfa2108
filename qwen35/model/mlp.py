"""SwiGLU feed-forward block: down(silu(gate(x)) * up(x)), no biases."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.linear import Linear, linear


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)
        self._gate_up = None  # fused [gate | up] (a matrix or weight object), see fusion_group()
        self.silu_mul = silu_mul  # reference; ops/fast.bind_kernels may bind the C++ one

    def fusion_group(self):
        """gate_proj and up_proj share their input: read them as one matrix `_gate_up`."""
        return self, "_gate_up", [self.gate_proj, self.up_proj]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._gate_up is None or torch.is_grad_enabled():  # autograd must see each parameter
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.silu_mul(linear(x, self._gate_up)))


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [..., gate | up]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
