"""Gated DeltaNet: linear attention with a constant-size recurrent state (3 layers in 4).

x -> in_proj_qkv -> causal depthwise conv (K taps) + SiLU -> split [q | k | v] (contiguous, not grouped)
q, k: L2-normalised (fp32, eps 1e-6), q scaled by Dk^-0.5, key heads repeated to the value heads
beta = sigmoid(in_proj_b(x)); g = -exp(A_log) * softplus(in_proj_a(x) + dt_bias), all in fp32
o = gated delta rule(q, k, v, g, beta; state) -> GatedRMSNorm(o, in_proj_z(x)) -> out_proj
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..deltanet_state import DeltaNetState
from ..ops.causal_conv import causal_conv1d_silu
from ..ops.gated_delta import gated_delta_rule
from ..ops.linear import Linear, linear
from .masks import LayerContext
from .norm import GatedRMSNorm


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) in fp32 (the sum form the reference kernels use)."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


class GatedDeltaNet(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_k_heads = config.linear_num_key_heads
        self.num_v_heads = config.linear_num_value_heads
        self.head_k_dim = config.linear_key_head_dim
        self.head_v_dim = config.linear_value_head_dim
        self.key_dim = config.linear_key_dim
        self.value_dim = config.linear_value_dim
        self.conv_dim = config.linear_conv_dim
        self.kernel_size = config.linear_conv_kernel_dim
        H = config.hidden_size
        self.in_proj_qkv = Linear(H, self.conv_dim, bias=False)
        self.in_proj_z = Linear(H, self.value_dim, bias=False)
        self.in_proj_b = Linear(H, self.num_v_heads, bias=False)
        self.in_proj_a = Linear(H, self.num_v_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel_size, groups=self.conv_dim,
                                bias=False, padding=self.kernel_size - 1)
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads))
        self.norm = GatedRMSNorm(self.head_v_dim, config.rms_norm_eps)
        self.out_proj = Linear(self.value_dim, H, bias=False)
        self._in_proj = None  # fused [qkv | z | b | a] (a matrix or weight object), see fusion_group()
        # The causal conv + SiLU of q|k|v and the delta rule: the references here; ops/fast.bind_kernels may bind
        # C++ ones.
        self.conv_silu = causal_conv1d_silu
        self.delta_rule = gated_delta_rule

    def fusion_group(self):
        """The four input projections share their input: read them as one matrix `_in_proj`."""
        return self, "_in_proj", [self.in_proj_qkv, self.in_proj_z, self.in_proj_b, self.in_proj_a]

    def project(self, x: torch.Tensor):
        """(qkv, z, b, a) projections of x [B, T, hidden]: one fused weight stream at inference."""
        if self._in_proj is None or torch.is_grad_enabled():  # autograd must see each parameter
            return self.in_proj_qkv(x), self.in_proj_z(x), self.in_proj_b(x), self.in_proj_a(x)
        return linear(x, self._in_proj).split([self.conv_dim, self.value_dim, self.num_v_heads, self.num_v_heads],
                                              dim=-1)

    def forward(self, x: torch.Tensor, state: DeltaNetState | None = None, ctx: LayerContext | None = None,
                mode: str = "auto") -> torch.Tensor:
        """x: [B, T, hidden] -> [B, T, hidden]. `state` (if given) is read and advanced by T tokens (new
        tensors are assigned to it; the old ones are never written, so snapshots stay valid).

        ctx.segments (packed training): conv taps stop at document starts and the recurrent state resets
        there (log decay -inf: nothing carried over, which the chunked form handles exactly).
        """
        B, T, _ = x.shape
        segments = None if ctx is None else ctx.segments
        qkv, z, b, a = self.project(x)
        qkv_in = qkv
        qkv, conv_state = self.conv_silu(qkv, self.conv1d.weight[:, 0], None if state is None else state.conv,
                                         None if segments is None else segments.taps)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = l2_normalize(q.reshape(B, T, self.num_k_heads, self.head_k_dim)) * self.head_k_dim**-0.5
        k = l2_normalize(k.reshape(B, T, self.num_k_heads, self.head_k_dim))
        v = v.reshape(B, T, self.num_v_heads, self.head_v_dim)
        if self.num_v_heads != self.num_k_heads:
            # Each key head serves num_v/num_k consecutive value heads.
            rep = self.num_v_heads // self.num_k_heads
            q, k = q.repeat_interleave(rep, dim=2), k.repeat_interleave(rep, dim=2)
        beta = b.float().sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())
        if segments is not None:
            g = g.masked_fill(segments.starts[..., None], float("-inf"))
        if state is not None and state.keep_steps:
            o, recurrent = self._stepwise(qkv_in, q, k, v, g, beta, state)
        else:
            o, recurrent = self.delta_rule(q, k, v, g, beta, None if state is None else state.recurrent, mode=mode)
        if state is not None:
            state.conv, state.recurrent = conv_state, recurrent
        z = z.reshape(B, T, self.num_v_heads, self.head_v_dim)
        o = self.norm(o, z, out_dtype=x.dtype).reshape(B, T, self.value_dim)
        return self.out_proj(o)

    def _stepwise(self, qkv_in, q, k, v, g, beta, state: DeltaNetState):
        """The delta rule one token at a time (the decode step's form), leaving in state.steps the conv
        window and recurrent state after each token (speculative verification: HybridCache.rewind)."""
        T = q.shape[1]
        window = torch.cat([state.conv, qkv_in], dim=1)  # the pre-conv inputs: token t's window ends at t
        rec, outs, convs, recs = state.recurrent, [], [], []
        for t in range(T):
            o_t, rec = self.delta_rule(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], g[:, t : t + 1],
                                        beta[:, t : t + 1], rec, mode="recurrent")
            outs.append(o_t)
            recs.append(rec)
            convs.append(window[:, t + 1 : t + self.kernel_size])
        state.steps = (convs, recs)
        return torch.cat(outs, dim=1), rec
