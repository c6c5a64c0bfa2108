"""Cross-entropy over a large vocabulary without a [rows, vocab] tensor: the head is applied a band of
vocabulary rows at a time.

Qwen3.5's vocabulary has 248,320 entries: at 1024 tokens the fp32 logits alone are 1 GB, and autograd keeps
them, their softmax and their gradient (3 GB), more than a quantized 4B's weights. `banded_cross_entropy`
is one autograd function: forward runs over vocabulary bands with an online log-sum-exp (each band's logits
live only while it is processed) and saves the hidden states, the labels and the log-sum-exp per row;
backward recomputes each band's logits, turns them into softmax - one-hot, and accumulates dH = dZ W band by
band (fp32). A quantized head (QuantizedWeight) is dequantized one band at a time, twice per step (forward
and backward) for all rows together, instead of three times per chunk of rows under gradient checkpointing.

Used when the head is frozen (LoRA / QLoRA: the head gets no gradient); a trainable head keeps the
row-chunked path in loop.py, which autograd differentiates for W too.
"""

from __future__ import annotations

import torch

from .data import IGNORE

BAND_BYTES = 32 * 2**20  # fp32 logits of one band for all rows (the band's softmax and weights come beside them)


def _band(w, s: int, e: int, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(w, torch.Tensor):
        return w[s:e].to(dtype)
    return w.dequantize(dtype, s, e)  # QuantizedWeight


class BandedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, w, labels: torch.Tensor, band: int, dtype: torch.dtype) -> torch.Tensor:
        N, V = h.shape[0], w.shape[0]
        hc = h.to(dtype)
        m = torch.full((N,), float("-inf"))
        s = torch.zeros(N)
        target = torch.zeros(N)
        valid = labels != IGNORE
        rows = torch.arange(N)
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            for a in range(0, V, band):
                b = min(V, a + band)
                z = (hc @ _band(w, a, b, dtype).T).float()
                new_m = torch.maximum(m, z.max(dim=1).values)
                s = s * torch.exp(m - new_m) + torch.exp(z - new_m[:, None]).sum(dim=1)
                m = new_m
                hit = valid & (labels >= a) & (labels < b)
                target[hit] = z[rows[hit], labels[hit] - a]
        lse = m + torch.log(s)
        ctx.save_for_backward(h, labels, lse)
        ctx.w, ctx.band, ctx.dtype = w, band, dtype
        return torch.where(valid, lse - target, 0.0).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, labels, lse = ctx.saved_tensors
        w, band, dtype = ctx.w, ctx.band, ctx.dtype
        N, V = h.shape[0], w.shape[0]
        hc = h.to(dtype)
        valid = labels != IGNORE
        scale = torch.where(valid, grad.float(), 0.0)[:, None]  # rows without a target get no gradient
        rows = torch.arange(N)
        dh = torch.zeros(N, h.shape[1])
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            for a in range(0, V, band):
                b = min(V, a + band)
                wb = _band(w, a, b, dtype)
                p = torch.exp((hc @ wb.T).float() - lse[:, None])  # softmax of the band
                hit = valid & (labels >= a) & (labels < b)
                p[rows[hit], labels[hit] - a] -= 1.0
                dh += ((p * scale).to(dtype) @ wb).float()
        return dh.to(h.dtype), None, None, None, None


def banded_cross_entropy(h: torch.Tensor, w, labels: torch.Tensor, band: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of the logits h @ w^T (h [N, K], w [V, K]: a frozen tensor or a QuantizedWeight)
    against labels [N] (IGNORE rows skipped), in fp32 like the model's logits; matmuls in bf16 under CPU
    autocast (as the unbanded head would run), else in h's dtype."""
    if isinstance(w, torch.Tensor) and w.requires_grad:
        raise ValueError("banded_cross_entropy gives the head no gradient: use it with a frozen head")
    dtype = torch.bfloat16 if torch.is_autocast_enabled("cpu") else h.dtype
    if band is None:
        band = max(1, BAND_BYTES // (4 * max(1, h.shape[0])))
    return BandedCrossEntropy.apply(h, w, labels, band, dtype)
