"""Gated full attention: the one layer in four that keeps a KV cache.

q_proj produces, per head, a query and an output gate interleaved ([q_h0 | g_h0 | q_h1 | g_h1 ...],
head_dim each). Queries and keys get a zero-centred RMSNorm over head_dim before partial RoPE; attention
is causal GQA with scale head_dim^-0.5; the output is multiplied by sigmoid(gate) before o_proj.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import KVCache
from ..config import ModelConfig
from ..ops.attention import decode_attention, decode_attention_q8, prompt_attention, prompt_attention_q8
from ..ops.linear import Linear, linear
from .masks import LayerContext
from .norm import RMSNorm
from .rope import apply_rope


class GatedAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        H = config.hidden_size
        self.q_proj = Linear(H, 2 * self.num_heads * self.head_dim, bias=False)
        self.k_proj = Linear(H, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = Linear(H, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = Linear(self.num_heads * self.head_dim, H, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self._qkv = None  # fused [q | k | v] (a matrix or weight object), see fusion_group()
        self.prompt_attention = prompt_attention  # a chunk of a prompt over the cache (bind_kernels may replace it)
        self.prompt_attention_q8 = prompt_attention_q8  # the same over a q8_0 buffer (bind_kernels may too)

    def fusion_group(self):
        """q_proj, k_proj and v_proj share their input: read them as one matrix `_qkv`."""
        return self, "_qkv", [self.q_proj, self.k_proj, self.v_proj]

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """q [B, Hq, T, D] and k, v [B, Hkv, T, D] (normed, rotated) and the output gate [B, T, Hq*D]."""
        B, T, _ = x.shape
        D = self.head_dim
        if self._qkv is None or torch.is_grad_enabled():  # autograd must see each parameter
            qg, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            kv = self.num_kv_heads * D
            qg, k, v = linear(x, self._qkv).split([2 * self.num_heads * D, kv, kv], dim=-1)
        qg = qg.reshape(B, T, self.num_heads, 2 * D)
        q, gate = qg[..., :D], qg[..., D:]
        q = self.q_norm(q).transpose(1, 2)
        k = self.k_norm(k.reshape(B, T, self.num_kv_heads, D)).transpose(1, 2)
        v = v.reshape(B, T, self.num_kv_heads, D).transpose(1, 2)
        cos, sin = rope
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, gate.reshape(B, T, -1)

    def output(self, out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """o_proj(attention output [B, Hq, T, D] * sigmoid(gate))."""
        B, _, T, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1) * torch.sigmoid(gate))

    def forward(self, x: torch.Tensor, state: KVCache | None = None, ctx: LayerContext | None = None) -> torch.Tensor:
        """x: [B, T, hidden] -> [B, T, hidden]. With a KVCache the new keys and values are appended to each
        row and every row attends over its own length; ctx.segments (packed training) replaces the causal
        mask with a per-document one. With state.keep_steps (a speculative verify) each token's attention is
        its decode step's: a prompt chunk's form rounds differently, so a verify run per op (a head grouping or
        head dim the whole-layer kernels do not take) had given other logits than plain decoding."""
        q, k, v, gate = self.project(x, ctx.rope)
        scale = self.head_dim**-0.5
        gqa = self.num_heads != self.num_kv_heads
        if state is None:
            mask = None if ctx.segments is None else ctx.segments.attn
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1,
                                                 scale=scale, enable_gqa=gqa)
            return self.output(out, gate)
        if state.kv_cache == "q8_0":
            return self.output(self._attend_q8(q, k, v, state, scale), gate)
        T = q.shape[2]
        outs = []
        for b, (kb, vb) in enumerate(state.update(k, v)):  # rows hold different lengths: one at a time
            past = kb.shape[2] - T
            qb = q[b : b + 1]
            if T == 1:
                outs.append(decode_attention(qb, kb, vb, scale))
            elif state.keep_steps:  # a speculative verify: token t as its decode step, over past + t + 1 keys
                outs.append(torch.cat([decode_attention(qb[:, :, t : t + 1], kb[:, :, : past + t + 1],
                                                        vb[:, :, : past + t + 1], scale) for t in range(T)], dim=2))
            else:
                outs.append(self.prompt_attention(qb, kb, vb, past, scale))
        return self.output(torch.cat(outs), gate)

    def _attend_q8(self, q, k, v, state: KVCache, scale: float) -> torch.Tensor:
        """Each row's queries over its q8_0 buffer, which no form here dequantizes whole (KVCache.update would:
        at a 128K prefix 2.5x the layer's bf16 KV bytes, transiently, for every prefill chunk): the prefill kernel
        reads the int8 blocks in place, the torch forms a block of keys at a time."""
        T = q.shape[2]
        outs = []
        for b, (row, buf) in enumerate(zip(state.rows, state.append(k, v))):
            n, qb = row.length + T, q[b : b + 1]  # the row's length advances when the whole forward ends
            if T == 1:
                outs.append(decode_attention_q8(qb, buf, n, scale))
            elif state.keep_steps:  # a speculative verify, as in forward
                outs.append(torch.cat([decode_attention_q8(qb[:, :, t : t + 1], buf, n - T + t + 1, scale)
                                       for t in range(T)], dim=2))
            else:
                outs.append(self.prompt_attention_q8(qb, buf, n - T, scale))
        return torch.cat(outs)
