"""Gated full attention: the one layer in four that keeps a KV cache.

q_proj produces, per head, a query and an output gate interleaved ([q_h0 | g_h0 | q_h1 | g_h1 ...],
head_dim each). Queries and keys get a zero-centred RMSNorm over head_dim before partial RoPE; attention
is causal GQA with scale head_dim^-0.5; the output is multiplied by sigmoid(gate) before o_proj.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.dispatch import fast_path_ok
from ..ops.linear import Linear, fused_weight, linear

from ..cache import KVCache
from ..config import ModelConfig
from .norm import RMSNorm
from .rope import apply_rope


_NO_PAD = torch.empty(0, dtype=torch.long)


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, scale: float) -> torch.Tensor:
    """Causal attention of a prompt chunk (queries at past..past+T-1) over [cached | chunk] keys.

    Split in two and merged by log-sum-exp, so no [T, past+T] mask is ever built (at 262K context that
    mask alone would be 134 MB per layer and chunk): all queries see every cached key (flash attention,
    the query heads of each KV head stacked as extra rows), and the chunk attends to itself causally.
    q [B, Hq, T, D]; k, v [B, Hkv, past+T, D]. Returns [B, Hq, T, D] in q's dtype.
    """
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    out_p, lse_p = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.reshape(B, Hkv, G * T, D), k[:, :, :past], v[:, :, :past], 0.0, False, scale=scale)
    out_p, lse_p = out_p.reshape(B, Hq, T, D).float(), lse_p.reshape(B, Hq, T)
    kc, vc = k[:, :, past:].float(), v[:, :, past:].float()
    if G > 1:
        kc, vc = kc.repeat_interleave(G, dim=1), vc.repeat_interleave(G, dim=1)
    scores = (q.float() @ kc.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    lse_c = scores.logsumexp(-1)
    out_c = torch.softmax(scores, dim=-1) @ vc
    m = torch.maximum(lse_p, lse_c)
    w_p, w_c = (lse_p - m).exp()[..., None], (lse_c - m).exp()[..., None]
    return ((w_p * out_p + w_c * out_c) / (w_p + w_c)).to(q.dtype)


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
        self._qkv: torch.Tensor | None = None
        groups = self.num_heads // self.num_kv_heads
        self._decode_kernel_ok = self.head_dim % 32 == 0 and self.head_dim <= 512 and groups in (1, 2, 4, 8)

    def fusion_group(self):
        """q_proj, k_proj and v_proj share their input: read them as one matrix `_qkv`."""
        return self, "_qkv", [self.q_proj, self.k_proj, self.v_proj]

    def _project(self, x: torch.Tensor):
        fused = fused_weight(self._qkv, self.q_proj, self.k_proj, self.v_proj)
        if fused is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        kv = self.num_kv_heads * self.head_dim
        return linear(x, fused).split([2 * self.num_heads * self.head_dim, kv, kv], dim=-1)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache | None = None,
        masks=None,
    ) -> torch.Tensor:
        """x: [B, T, hidden]; rope: (cos, sin) [B or 1, T, R]; masks: PaddingMasks of a left-padded batch
        (its attention mask replaces the plain causal one). Returns [B, T, hidden]."""
        B, T, _ = x.shape
        D = self.head_dim
        qg, k, v = self._project(x)
        qg = qg.reshape(B, T, self.num_heads, 2 * D)
        q, gate = qg[..., :D], qg[..., D:]
        q = self.q_norm(q).transpose(1, 2)  # [B, Hq, T, D]
        k = self.k_norm(k.reshape(B, T, self.num_kv_heads, D)).transpose(1, 2)
        v = v.reshape(B, T, self.num_kv_heads, D).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(k, v)
            if T == 1 and self._decode_kernel_ok and fast_path_ok(q, (torch.bfloat16,)) and k.dtype == torch.bfloat16:
                pad = masks.pad if masks is not None else _NO_PAD
                out = torch.ops.qwen35.attn_decode(q.reshape(B, self.num_heads, D).contiguous(), k, v, k.shape[2],
                                                   pad, D**-0.5)
                out = out.reshape(B, 1, self.num_heads * D) * torch.sigmoid(gate.reshape(B, 1, -1))
                return self.o_proj(out)
        attn_mask = None if masks is None else masks.attn
        if attn_mask is None and past and T > 1:
            out = chunk_attention(q, k, v, past, D**-0.5)
            out = out.transpose(1, 2).reshape(B, T, self.num_heads * D)
            return self.o_proj(out * torch.sigmoid(gate.reshape(B, T, -1)))
        out = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            is_causal=attn_mask is None and past == 0 and T > 1,
            scale=D**-0.5,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * D)
        out = out * torch.sigmoid(gate.reshape(B, T, -1))
        return self.o_proj(out)
