"""What a forward passes down to every decoder layer besides the hidden states: `LayerContext`.

No global per-step context: the model builds one of these per forward (rotary tables for the positions of
this call, and for packed training rows the document masks) and hands it to each layer as an argument.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SegmentMasks:
    """Masks for packed training sequences: several documents per row, none may see another.

    segments: [B, T] document ids. attn: [B, 1, T, T] causal within a document; starts: [B, T] first token
    of each document (the Gated DeltaNet state resets there); taps: [B, T, K] conv taps that stay inside the
    token's document; positions: [B, T] counted from each document's start.
    """

    attn: torch.Tensor
    starts: torch.Tensor
    taps: torch.Tensor
    positions: torch.Tensor

    @classmethod
    def build(cls, segments: torch.Tensor, kernel_size: int) -> SegmentMasks:
        B, T = segments.shape
        idx = torch.arange(T, device=segments.device)
        same = segments[:, :, None] == segments[:, None, :]
        attn = same & (idx[None, :] <= idx[:, None])[None]
        starts = torch.ones_like(segments, dtype=torch.bool)
        starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
        first = torch.where(starts, idx[None].expand(B, T), torch.zeros_like(segments))
        positions = idx[None] - first.cummax(dim=1).values
        taps = torch.zeros(B, T, kernel_size, dtype=torch.bool, device=segments.device)
        for j in range(kernel_size):
            back = kernel_size - 1 - j
            if back == 0:
                taps[..., j] = True
            else:
                taps[:, back:, j] = segments[:, back:] == segments[:, :-back]
        return cls(attn[:, None], starts, taps.float(), positions)


@dataclass(frozen=True)
class LayerContext:
    """rope: (cos, sin) [B or 1, T, R] for this call's positions; segments: SegmentMasks of packed
    training rows, or None."""

    rope: tuple[torch.Tensor, torch.Tensor]
    segments: SegmentMasks | None = None
