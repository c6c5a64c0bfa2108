"""SwiGLU feed-forward block: down(silu(gate(x)) * up(x)), no biases."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.dispatch import fast_path_ok
from ..ops.linear import Linear, fused_weight, linear


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)
        self._gate_up: torch.Tensor | None = None

    def fusion_group(self):
        """gate_proj and up_proj share their input: read them as one matrix `_gate_up`."""
        return self, "_gate_up", [self.gate_proj, self.up_proj]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = fused_weight(self._gate_up, self.gate_proj, self.up_proj)
        if fused is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate_up = linear(x, fused)
        if gate_up.shape[-1] % 32 == 0 and fast_path_ok(gate_up, (torch.bfloat16,)):
            return self.down_proj(torch.ops.qwen35.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
