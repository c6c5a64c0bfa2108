"""GGUF's K-quant layouts Q4_K and Q6_K: their reference quantizers and dequantizers, in torch.

Both work on super-blocks of 256 weights along K, stored as GGUF's block bytes verbatim (qs uint8
[N, K/256 * bytes per block]; formats.py's `d` is an empty [N, 0] array for them): a GGUF tensor's rows
are our rows as they are, with no repacking either way, and the kernels (ops/kernels/quant_k_kernels.cpp)
read one stream.
- Q4_K, 144 bytes per 256 (4.5 bits/weight): fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins for the
  8 sub-blocks of 32, then 128 bytes of nibbles (bytes 32c..32c+31 hold sub-block 2c in their low nibbles,
  2c+1 in their high ones). w = d * sc_j * q - dmin * m_j.
- Q6_K, 210 bytes per 256 (6.5625 bits/weight): 128 bytes of low nibbles, 64 bytes of high 2-bit pairs,
  16 int8 scales (one per 16 weights), fp16 d. w = d * sc_j * (q - 32).

The quantizers follow the algorithm of ggml's reference quantizers (the path llama.cpp's `quantize` takes
without an importance matrix): Q4_K fits a scale and a min to each sub-block by a weighted least-squares
search over 21 candidate scales, then quantizes the 8 scales and 8 mins to 6 bits against their maxima;
Q6_K picks each 16-weight scale from 19 candidates by the x^2-weighted fit, then quantizes the 16 scales
to int8. Every sum runs element by element in the order ggml's loops do, vectorized across blocks (not
torch's reductions, whose order differs), so the C++ quantizer can be tested against it byte for byte.
"""

from __future__ import annotations

import torch

QK = 256
Q4K_BYTES = 144
Q6K_BYTES = 210

_f = torch.float32


def _c(v: float) -> torch.Tensor:
    """A fp32 constant: every operation below rounds to fp32, as ggml's C does."""
    return torch.tensor(v, dtype=_f)


def _seq_sum(t: torch.Tensor) -> torch.Tensor:
    """t [..., n] summed left to right, one fp32 rounding per addition (C's `for (...) s += t[i]`)."""
    s = torch.zeros(t.shape[:-1], dtype=_f)
    for i in range(t.shape[-1]):
        s = s + t[..., i]
    return s


def _first_max_abs(x: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude, its first occurrence (C's strict `>` scan)."""
    return x.gather(-1, x.abs().argmax(-1, keepdim=True))[..., 0]


def _fit_min_scale(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Scale and min for sub-blocks x [B, n] (weights w): x ~ scale * L - min, L in 0..nmax, choosing among
    nstep+1 candidate scales the one whose least-squares (scale, min) has the least weighted error.
    Returns (scale [B], min [B] >= 0, L uint8 [B, n])."""
    mn = torch.minimum(x.amin(-1), _c(0.0))
    mx = x.amax(-1)
    sum_w = _seq_sum(w)
    sum_x = _seq_sum(w * x)
    flat = mx == mn
    iscale = _c(nmax) / torch.where(flat, _c(1.0), mx - mn)
    scale = _c(1.0) / iscale
    L = torch.round(iscale[:, None] * (x - mn[:, None])).clamp(0, nmax)
    diff = scale[:, None] * L + mn[:, None] - x
    best = _seq_sum(w * (diff * diff))
    for step in range(nstep + 1):
        # the range and offset are those of the best fit so far, as in ggml's loop
        cand = (_c(rmin) + _c(rdelta) * _c(step)) + _c(nmax)
        rng = torch.where(flat, _c(1.0), mx - mn)
        Lc = torch.round((cand / rng)[:, None] * (x - mn[:, None])).clamp(0, nmax)
        wl = w * Lc
        sum_l, sum_l2, sum_xl = _seq_sum(wl), _seq_sum(wl * Lc), _seq_sum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = torch.where(ok, D, _c(1.0))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = this_min > 0
        this_min = torch.where(pos, _c(0.0), this_min)
        this_scale = torch.where(pos, sum_xl / torch.where(sum_l2 != 0, sum_l2, _c(1.0)), this_scale)
        d = this_scale[:, None] * Lc + this_min[:, None] - x
        err = _seq_sum(w * (d * d))
        better = ok & ~flat & (err < best)
        L = torch.where(better[:, None], Lc, L)
        best = torch.where(better, err, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    scale = torch.where(flat, _c(0.0), scale)
    L = torch.where(flat[:, None], _c(0.0), L)
    return scale, -mn, L.to(torch.uint8)


def _fit_scale_x2(x: torch.Tensor, nmax: int):
    """Signed scale for sub-blocks x [B, n]: x ~ scale * l, l in -nmax..nmax-1, the best x^2-weighted fit
    among 19 candidates around -nmax / (the value of largest magnitude). Returns (scale [B], L uint8 [B, n]
    = l + nmax, 0 for an all-zero sub-block)."""
    mx = _first_max_abs(x)
    zero = mx.abs() < 1e-15
    mxs = torch.where(zero, _c(1.0), mx)
    w = x * x

    def fit(iscale):
        li = torch.round(iscale[:, None] * x).clamp(-nmax, nmax - 1)
        return li, _seq_sum((w * x) * li), _seq_sum((w * li) * li)

    li, sumlx, suml2 = fit(_c(-nmax) / mxs)
    scale = torch.where(suml2 != 0, sumlx / torch.where(suml2 != 0, suml2, _c(1.0)), _c(0.0))
    best = scale * sumlx
    L = li + nmax
    for step in [s for s in range(-9, 10) if s]:
        li, sumlx, suml2 = fit(-(_c(nmax) + _c(0.1) * _c(step)) / mxs)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = torch.where(better[:, None], li + nmax, L)
        scale = torch.where(better, sumlx / torch.where(suml2 > 0, suml2, _c(1.0)), scale)
        best = torch.where(better, scale * sumlx, best)
    return torch.where(zero, _c(0.0), scale), torch.where(zero[:, None], _c(0.0), L).to(torch.uint8)


def _half_bytes(v: torch.Tensor) -> torch.Tensor:
    """fp32 [...] -> its fp16 (round to nearest even) as 2 little-endian bytes [..., 2]."""
    return v.half().contiguous().view(torch.uint8).reshape(*v.shape, 2)


def _superblocks(w: torch.Tensor) -> torch.Tensor:
    N, K = w.shape
    assert K % QK == 0, (N, K)
    return w.float().reshape(N * K // QK, QK)


def quantize_q4_k(w: torch.Tensor) -> torch.Tensor:
    """w [N, K] (K % 256 == 0) -> GGUF Q4_K blocks, uint8 [N, K/256*144]."""
    N, K = w.shape
    x = _superblocks(w)  # [S, 256]
    S = x.shape[0]
    xs = x.reshape(S * 8, 32)
    # sqrt in fp64 rounded once to fp32 is C's correctly rounded sqrtf (torch's fp32 sqrt can be 1 ulp off)
    av = torch.sqrt((_seq_sum(xs * xs) / _c(32.0)).double()).float()
    scales, mins, L = _fit_min_scale(xs, av[:, None] + xs.abs(), 15, -1.0, 0.1, 20)
    scales, mins = scales.reshape(S, 8), mins.reshape(S, 8)
    # ggml's running maxima start at +0 and take only larger values (so never -0)
    max_scale = torch.where(scales.amax(-1) > 0, scales.amax(-1), _c(0.0))
    max_min = torch.where(mins.amax(-1) > 0, mins.amax(-1), _c(0.0))
    inv_s = torch.where(max_scale > 0, _c(63.0) / torch.where(max_scale > 0, max_scale, _c(1.0)), _c(0.0))
    inv_m = torch.where(max_min > 0, _c(63.0) / torch.where(max_min > 0, max_min, _c(1.0)), _c(0.0))
    # C stores nearest_int into a uint8 before clamping to 63: keep the wrap
    ls = (torch.round(inv_s[:, None] * scales).to(torch.int32) & 0xFF).clamp(max=63)
    lm = (torch.round(inv_m[:, None] * mins).to(torch.int32) & 0xFF).clamp(max=63)
    d = (max_scale / _c(63.0)).half()
    dmin = (max_min / _c(63.0)).half()
    dj = d.float()[:, None] * ls.float()
    dm = dmin.float()[:, None] * lm.float()
    Lr = torch.round((x.reshape(S, 8, 32) + dm[..., None]) / torch.where(dj != 0, dj, _c(1.0))[..., None]).clamp(0, 15)
    L = torch.where((dj != 0)[..., None], Lr, L.reshape(S, 8, 32).float()).to(torch.uint8)
    qs = (L[:, 0::2] | (L[:, 1::2] << 4)).reshape(S, 128)
    packed = torch.zeros(S, 12, dtype=torch.int32)
    packed[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    packed[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    out = torch.cat([_half_bytes(d), _half_bytes(dmin), packed.to(torch.uint8), qs], -1)
    return out.reshape(N, K // QK * Q4K_BYTES)


def quantize_q6_k(w: torch.Tensor) -> torch.Tensor:
    """w [N, K] (K % 256 == 0) -> GGUF Q6_K blocks, uint8 [N, K/256*210]."""
    N, K = w.shape
    x = _superblocks(w)
    S = x.shape[0]
    scales, L = _fit_scale_x2(x.reshape(S * 16, 16), 32)
    scales, L = scales.reshape(S, 16), L.reshape(S, 16, 16)
    max_scale = _first_max_abs(scales)
    zero = max_scale.abs() < 1e-15
    iscale = _c(-128.0) / torch.where(zero, _c(1.0), max_scale)
    d = torch.where(zero, _c(0.0), _c(1.0) / iscale).half()
    sc = torch.round(iscale[:, None] * scales).clamp(max=127)
    sc = torch.where(zero[:, None], _c(0.0), sc)
    dj = d.float()[:, None] * sc
    Lr = torch.round(x.reshape(S, 16, 16) / torch.where(dj != 0, dj, _c(1.0))[..., None]).clamp(-32, 31) + 32
    L = torch.where((dj != 0)[..., None], Lr, L.float()).to(torch.uint8).reshape(S, 2, 4, 32)
    L = torch.where(zero[:, None, None, None], torch.zeros_like(L), L)
    lo = L & 0xF
    ql = torch.cat([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], -1)  # [S, 2, 64]
    hi = L >> 4
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)  # [S, 2, 32]
    out = torch.cat([ql.reshape(S, 128), qh.reshape(S, 64), sc.to(torch.int8).view(torch.uint8), _half_bytes(d)], -1)
    return out.reshape(N, K // QK * Q6K_BYTES)


def _half_at(b: torch.Tensor, at: int) -> torch.Tensor:
    return b[..., at : at + 2].contiguous().view(torch.float16)[..., 0].float()


def block_scales(name: str, qs: torch.Tensor) -> torch.Tensor:
    """The fp16 super-block scales inside K-quant bytes qs [N, K/256*bytes]: Q4_K's d and dmin, Q6_K's d."""
    b = qs.reshape(qs.shape[0], -1, Q4K_BYTES if name == "q4_k" else Q6K_BYTES)
    at = b[..., 0:4] if name == "q4_k" else b[..., 208:210]
    return at.contiguous().view(torch.float16)


def q4_k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed bytes [..., 12] -> 6-bit scales and mins [..., 8] (int32)."""
    b = b.to(torch.int32)
    lo, mid, hi = b[..., 0:4], b[..., 4:8], b[..., 8:12]
    sc = torch.cat([lo & 63, (hi & 0xF) | ((lo >> 6) << 4)], -1)
    m = torch.cat([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], -1)
    return sc, m


def dequantize_q4_k(qs: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/256*144] -> fp32 [N, K]."""
    N = qs.shape[0]
    b = qs.reshape(N, -1, Q4K_BYTES)
    sc, m = q4_k_scales(b[..., 4:16])
    d = _half_at(b, 0)[..., None] * sc.float()
    dm = _half_at(b, 2)[..., None] * m.float()
    q = b[..., 16:].reshape(N, -1, 4, 1, 32)
    q = torch.cat([q & 0xF, q >> 4], -2).reshape(N, -1, 8, 32).float()
    return (d[..., None] * q - dm[..., None]).reshape(N, -1)


def dequantize_q6_k(qs: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/256*210] -> fp32 [N, K]."""
    N = qs.shape[0]
    b = qs.reshape(N, -1, Q6K_BYTES)
    ql = b[..., :128].reshape(N, -1, 2, 1, 64)
    ql = torch.cat([ql & 0xF, ql >> 4], -2).reshape(N, -1, 2, 4, 32)
    qh = b[..., 128:192].reshape(N, -1, 2, 1, 32).to(torch.int32)
    qh = ((qh >> torch.tensor([0, 2, 4, 6]).reshape(4, 1)) & 3).reshape(N, -1, 2, 4, 32)
    q = (ql.to(torch.int32) | (qh << 4)).float() - 32
    sc = b[..., 192:208].contiguous().view(torch.int8).float()
    d = (_half_at(b, 208)[..., None] * sc).reshape(N, -1, 16, 1)
    return (d * q.reshape(N, -1, 16, 16)).reshape(N, -1)
