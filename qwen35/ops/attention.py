"""Attention of a prompt chunk over a row's keys: `prompt_attention` (the reference form GatedAttention calls,
which kernels replace: ops/step_forms.prefill_attention), built on `chunk_attention` for the cached part; of one
decoded token over them: `decode_attention`. Over a q8_0 KV buffer (kv_storage.py): `prompt_attention_q8` and
`decode_attention_q8`, the same computations over keys dequantized a block of KEY_BLOCK at a time.

Split in two and merged by log-sum-exp, so no [T, past+T] mask is ever built (at 262K context that mask
alone would be 134 MB per layer and chunk): all queries see every cached key, and the chunk attends to
itself causally. The cached part needs the log-sum-exp beside the output; torch's CPU flash attention
returns it (a private aten op: `_flash_past` uses it where this torch has it), and `_blockwise_past`
computes the same with public ops, block by block over the keys, where it does not.

Keys are read through a `read(s0, s1) -> (k, v)` of keys [s0, s1) ([B, Hkv, s1 - s0, D]): views of a bf16
cache, or a block of a q8_0 cache dequantized on its own. Reading a q8_0 prefix whole had dequantized it
through fp32: at 128K, 651 MiB transient for one layer's chunk (2.5x that layer's bf16 KV), and at 64K more
time than the attention itself.
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


def _slices(k, v):
    """`read` over k, v [B, Hkv, S, D]: views."""
    return lambda s0, s1: (k[:, :, s0:s1], v[:, :, s0:s1])


def _buffer_reader(buf, dtype):
    """`read` over a KV buffer (kv_storage.py) of one row: slots [s0, s1) as [1, Hkv, n, D] in dtype, a q8_0
    buffer's dequantized for that range only."""

    def read(s0, s1):
        k, v = buf.read_range(s0, s1, dtype)
        return k[None], v[None]

    return read


def _blockwise(q, read, n, scale):
    """Attention of q [B, Hkv, M, D] over keys [0, n) read a block of KEY_BLOCK at a time, in fp32 with a running
    max and sum (online softmax). -> (output [B, Hkv, M, D], log-sum-exp [B, Hkv, M]), fp32."""
    qf = q.float()
    m = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
    denom = torch.zeros_like(m)
    acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # (values have the keys' head dim)
    for s0 in range(0, n, KEY_BLOCK):
        k, v = read(s0, min(n, s0 + KEY_BLOCK))
        s = (qf @ k.float().transpose(-1, -2)) * scale
        m_new = torch.maximum(m, s.amax(-1))
        w_old, p = (m - m_new).exp(), (s - m_new[..., None]).exp()
        denom = denom * w_old + p.sum(-1)
        acc = acc * w_old[..., None] + p @ v.float()
        m = m_new
    return acc / denom[..., None], m + denom.log()


def _blockwise_past(q, k, v, scale):
    return _blockwise(q, _slices(k, v), k.shape[2], scale)


def _merge(out_a, lse_a, out_b, lse_b):
    """Two attentions of the same queries over disjoint keys -> theirs over all of them: each output weighed by
    its share of the softmax's sum (from the log-sum-exps). -> (output, log-sum-exp), fp32."""
    m = torch.maximum(lse_a, lse_b)
    w_a, w_b = (lse_a - m).exp()[..., None], (lse_b - m).exp()[..., None]
    return (w_a * out_a + w_b * out_b) / (w_a + w_b), m + (w_a + w_b)[..., 0].log()


def _default_past():
    return _flash_past if _FLASH is not None else _blockwise_past


def _past_in_blocks(q, read, past, scale, past_attention):
    """past_attention over keys [0, past) a block of KEY_BLOCK at a time, the blocks merged by their log-sum-exps:
    only one block's keys are read (dequantized) at once."""
    out = lse = None
    for s0 in range(0, past, KEY_BLOCK):
        o, l = past_attention(q, *read(s0, min(past, s0 + KEY_BLOCK)), scale)
        out, lse = (o, l) if out is None else _merge(out, lse, o, l)
    return out, lse


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, scale: float,
                    past_attention=None) -> torch.Tensor:
    """Causal attention of a prompt chunk (queries at past..past+T-1) over [cached | chunk] keys.

    q [B, Hq, T, D]; k, v [B, Hkv, past+T, D]. Returns [B, Hq, T, D] in q's dtype.
    past_attention: `_flash_past` or `_blockwise_past` (default: flash where available).
    """
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    past_attention = past_attention or _default_past()
    out_p, lse_p = past_attention(q.reshape(B, Hkv, (Hq // Hkv) * T, D), k[:, :, :past], v[:, :, :past], scale)
    return _with_chunk(q, out_p, lse_p, k[:, :, past:], v[:, :, past:], scale)


def _with_chunk(q, out_p, lse_p, kc, vc, scale):
    """The cached keys' part (out_p [B, Hkv, G*T, D] and its log-sum-exp, as past_attention returns them) merged
    with the chunk's causal attention over its own keys kc, vc [B, Hkv, T, D]. -> [B, Hq, T, D] in q's dtype."""
    B, Hq, T, D = q.shape
    G = Hq // kc.shape[1]
    out_p, lse_p = out_p.reshape(B, Hq, T, D), lse_p.reshape(B, Hq, T)
    kc, vc = kc.float(), vc.float()
    if G > 1:
        kc, vc = kc.repeat_interleave(G, dim=1), vc.repeat_interleave(G, dim=1)
    scores = (q.float() @ kc.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    lse_c = scores.logsumexp(-1)
    out_c = torch.softmax(scores, dim=-1) @ vc
    return _merge(out_p, lse_p, out_c, lse_c)[0].to(q.dtype)


def prompt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, scale: float) -> torch.Tensor:
    """Causal attention of a chunk of T > 1 queries at positions past..past+T-1 over the row's past + T keys
    (the chunk's own last). q [1, Hq, T, D]; k, v [1, Hkv, past+T, D] -> [1, Hq, T, D] in q's dtype."""
    if past:
        return chunk_attention(q, k, v, past, scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def prompt_attention_q8(q: torch.Tensor, buf, past: int, scale: float) -> torch.Tensor:
    """prompt_attention over a row's q8_0 KV buffer (kv_storage.Q8KVBuffer) holding past + T keys, the chunk's
    last: the cached keys dequantized (to q's dtype) and attended a block of KEY_BLOCK at a time, the blocks
    merged by their log-sum-exps, so what exists at once is one block's keys and values, not the prefix's.
    q [1, Hq, T, D] -> [1, Hq, T, D] in q's dtype; equal to prompt_attention over the dequantized prefix up to
    the order of the float sums. Kernels replace it: ops/step_forms.prefill_attention_q8."""
    B, Hq, T, D = q.shape
    read = _buffer_reader(buf, q.dtype)
    kc, vc = read(past, past + T)
    if not past:
        return F.scaled_dot_product_attention(q, kc, vc, is_causal=True, scale=scale, enable_gqa=Hq != kc.shape[1])
    Hkv = kc.shape[1]
    out_p, lse_p = _past_in_blocks(q.reshape(B, Hkv, (Hq // Hkv) * T, D), read, past, scale, _default_past())
    return _with_chunk(q, out_p, lse_p, kc, vc, scale)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of the last position's query over every key (a decode step: the new token's key is the last).

    q [B, Hq, 1, D]; k, v [B, Hkv, S, D]. Returns [B, Hq, 1, D] in q's dtype. fp32 block by block over the keys
    (`_blockwise_past`): torch's CPU flash attention takes 8-17x longer for a single query (8 query / 2 KV heads
    of 256, 2 threads: S 2048 3.7-3.8 ms against 0.41-0.49 ms, S 8192 18-20 ms against 2.3-4.4 ms, on AVX512-BF16
    and held to AVX2 alike; benchmarks in the README), and rounds its scores no better. Where the C++ kernels are
    bound, their attn_decode runs instead."""
    return _decode(q, _slices(k, v), k.shape[1], k.shape[2], scale)


def decode_attention_q8(q: torch.Tensor, buf, n: int, scale: float) -> torch.Tensor:
    """decode_attention over the first n keys of a row's q8_0 KV buffer, each block of KEY_BLOCK keys dequantized
    (to q's dtype) on its own: the same numbers as over the dequantized prefix. q [1, Hq, 1, D]. Where the C++
    kernels are bound, attn_decode_q8 / decode_attn_layer read the int8 blocks in place instead."""
    return _decode(q, _buffer_reader(buf, q.dtype), buf.k.shape[0], n, scale)


def _decode(q, read, Hkv, n, scale):
    B, Hq, T, D = q.shape
    out, _ = _blockwise(q.reshape(B, Hkv, (Hq // Hkv) * T, D), read, n, scale)
    return out.reshape(B, Hq, T, D).to(q.dtype)
