"""Picking from a row of logits or weights: argmax, the k largest (top_k), a draw in proportion (draw). Each
equals what torch's own op (or a stable sort, or a cumulative sum) gives, faster over a 248,320-token
vocabulary; the Sampler (sampling.py) builds on them, and speculative decoding draws with them."""

from __future__ import annotations

import math

import torch

from .errors import SamplingError

# top_k_rows (ops/kernels/topk_kernels.cpp) keeps a sorted buffer of k: quick for the few values sampling asks
# for, quadratic in k beyond that, where torch's topk takes over
KERNEL_TOP_K = 64


def _kernel_ready(x: torch.Tensor):
    """The top-k kernel for x (top_k_rows, or portable_top_k_rows where the AVX512 library cannot load), or None."""
    from .ops import kernels

    if not (x.device.type == "cpu" and x.dtype == torch.float32 and x.stride(-1) == 1):
        return None
    if kernels.available():
        return torch.ops.qwen35.top_k_rows
    return torch.ops.qwen35.portable_top_k_rows if kernels.portable_available() else None


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1) of logits [B, V]: the same index (the first maximum; NaN counts as the largest, as in
    torch). torch's argmax along one long row runs serially without SIMD (~0.2-0.45 ms for 248,320 logits
    here, 1-2% of a 0.8B int4 token); the top-1 kernel reads the row once (~20 us from cache). Rows holding a
    NaN, and machines without the kernels, take `segmented_argmax`. Both tested against torch.argmax."""
    op = _kernel_ready(x) if x.dim() == 2 else None
    if op is not None:
        _, ids, ok = op(x, 1)
        if bool(ok.all()):
            return ids[:, 0]
    return segmented_argmax(x)


def segmented_argmax(x: torch.Tensor) -> torch.Tensor:
    """argmax as the largest of 8 segments' maxima: torch's max over segments vectorizes and splits across
    threads, its argmax along one long row does neither."""
    B, V = x.shape
    if V % 8 or V < 4096:
        return x.argmax(-1)
    v, i = x.reshape(B, 8, V // 8).max(-1)
    h = v.argmax(-1)
    return h * (V // 8) + i.gather(1, h[:, None])[:, 0]


def top_k(y: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest values of one row y [V] and their ids, highest first, equal values by ascending id (the
    order a stable sort of the row gives). NaN counts as the largest, as in torch.topk."""
    op = _kernel_ready(y) if k <= KERNEL_TOP_K else None
    if op is not None:
        vals, ids, ok = op(y[None], k)
        if bool(ok[0]):
            return vals[0], ids[0]
    vals, ids = y.topk(k)
    kth = vals[-1]
    inside = int((vals == kth).sum())
    if int((y == kth).sum()) > inside:  # a run of values equal to the k-th is cut: keep its lowest ids
        above = vals > kth
        vals = torch.cat([vals[above], vals.new_full((inside,), float(kth))])
        ids = torch.cat([ids[above], (y == kth).nonzero()[:inside, 0]])
    return _ties_by_id(vals, ids)


def _ties_by_id(vals: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Values sorted highest first and their ids, reordered so equal values come by ascending id (what a stable
    sort of the whole vocabulary gives; topk orders ties arbitrarily). Runs of equal logits are rare, so the
    second sort happens only where there is one."""
    if vals.numel() > 1 and bool((vals[1:] == vals[:-1]).any()):
        order = ids.argsort(stable=True)
        vals, ids = vals[order], ids[order]
        order = vals.argsort(descending=True, stable=True)
        return vals[order], ids[order]
    return vals, ids


DRAW_BLOCK = 512  # weights per block of draw's two-level search


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """An index drawn with probability proportional to probs [n] (non-negative, zeros allowed, any positive
    total) from one uniform number: the inverse of their running sum. torch.multinomial takes 5 ms over a
    248,320-token vocabulary here, a cumulative sum of all of it ~0.3 ms; a long row is searched in two levels
    instead: the block of DRAW_BLOCK weights the target falls in (from the blocks' sums), then the weight within
    it (its running sum from the blocks before)."""
    n = probs.numel()
    blocks = n > 8 * DRAW_BLOCK
    if blocks:  # the blocks' running sum, whose last entry is the total
        full = n // DRAW_BLOCK * DRAW_BLOCK
        sums = probs[:full].view(-1, DRAW_BLOCK).sum(1)
        if full < n:
            sums = torch.cat([sums, probs[full:].sum()[None]])
        cdf = sums.cumsum(0)
    else:
        cdf = probs.cumsum(0)
    total = float(cdf[-1])
    if not (math.isfinite(total) and total > 0):
        raise SamplingError(f"cannot draw a token: the probabilities sum to {total} (NaN or infinite logits, or "
                            "every token masked)")
    u = torch.rand((), generator=generator, dtype=probs.dtype)
    target = u * cdf[-1]
    if blocks:
        b = min(int(torch.searchsorted(cdf, target[None], right=True)[0]), cdf.numel() - 1)
        lo = b * DRAW_BLOCK
        block = probs[lo : min(n, lo + DRAW_BLOCK)]
        local = block.cumsum(0) + (cdf[b - 1] if b > 0 else 0)
        i = int(torch.searchsorted(local, target[None], right=True)[0])
        if i < block.numel() and bool(block[i] > 0):
            return lo + i
        # the two levels' rounding put the target past the block's last weight: the plain search decides
        cdf = probs.cumsum(0)
        target = u * cdf[-1]
    i = int(torch.searchsorted(cdf, target[None], right=True)[0])
    if i >= n or not bool(probs[i] > 0):  # u rounded up to the total: the last token that can be drawn
        i = int((probs > 0).nonzero()[-1, 0])
    return i
