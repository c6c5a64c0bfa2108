"""Attention of a prompt chunk over a row's keys: `prompt_attention` (the reference form GatedAttention calls,
which kernels replace: ops/step_forms.prefill_attention), built on `chunk_attention` for the cached part; of one
decoded token over them: `decode_attention`.

Split in two and merged by log-sum-exp, so no [T, past+T] mask is ever built (at 262K context that mask
alone would be 134 MB per layer and chunk): all queries see every cached key, and the chunk attends to
itself causally. The cached part needs the log-sum-exp beside the output; torch's CPU flash attention
returns it (a private aten op: `_flash_past` uses it where this torch has it), and `_blockwise_past`
computes the same with public ops, block by block over the keys, where it does not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
KEY_BLOCK = 4096  # keys per block in the public fallback: bounds its [T, block] score matrix


def _flash_past(q, k, v, scale):
    """q [B, Hkv, G*T, D] (the query heads of each KV head stacked as rows), k, v [B, Hkv, S, D]."""
    out, lse = _FLASH(q, k, v, 0.0, False, scale=scale)
    return out.float(), lse.float()


def _blockwise_past(q, k, v, scale):
    qf = q.float()
    m = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
    denom = torch.zeros_like(m)
    acc = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=torch.float32, device=q.device)
    for s0 in range(0, k.shape[2], KEY_BLOCK):
        s = (qf @ k[:, :, s0 : s0 + KEY_BLOCK].float().transpose(-1, -2)) * scale
        m_new = torch.maximum(m, s.amax(-1))
        w_old, p = (m - m_new).exp(), (s - m_new[..., None]).exp()
        denom = denom * w_old + p.sum(-1)
        acc = acc * w_old[..., None] + p @ v[:, :, s0 : s0 + KEY_BLOCK].float()
        m = m_new
    return acc / denom[..., None], m + denom.log()


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, scale: float,
                    past_attention=None) -> torch.Tensor:
    """Causal attention of a prompt chunk (queries at past..past+T-1) over [cached | chunk] keys.

    q [B, Hq, T, D]; k, v [B, Hkv, past+T, D]. Returns [B, Hq, T, D] in q's dtype.
    past_attention: `_flash_past` or `_blockwise_past` (default: flash where available).
    """
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    past_attention = past_attention or (_flash_past if _FLASH is not None else _blockwise_past)
    out_p, lse_p = past_attention(q.reshape(B, Hkv, G * T, D), k[:, :, :past], v[:, :, :past], scale)
    out_p, lse_p = out_p.reshape(B, Hq, T, D), lse_p.reshape(B, Hq, T)
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


def prompt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, scale: float) -> torch.Tensor:
    """Causal attention of a chunk of T > 1 queries at positions past..past+T-1 over the row's past + T keys
    (the chunk's own last). q [1, Hq, T, D]; k, v [1, Hkv, past+T, D] -> [1, Hq, T, D] in q's dtype."""
    if past:
        return chunk_attention(q, k, v, past, scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of the last position's query over every key (a decode step: the new token's key is the last).

    q [B, Hq, 1, D]; k, v [B, Hkv, S, D]. Returns [B, Hq, 1, D] in q's dtype. fp32 block by block over the keys
    (`_blockwise_past`): torch's CPU flash attention takes 8-17x longer for a single query (8 query / 2 KV heads
    of 256, 2 threads: S 2048 3.7-3.8 ms against 0.41-0.49 ms, S 8192 18-20 ms against 2.3-4.4 ms, on AVX512-BF16
    and held to AVX2 alike; benchmarks in the README), and rounds its scores no better. Where the C++ kernels are
    bound, their attn_decode runs instead."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    out, _ = _blockwise_past(q.reshape(B, Hkv, (Hq // Hkv) * T, D), k, v, scale)
    return out.reshape(B, Hq, T, D).to(q.dtype)
