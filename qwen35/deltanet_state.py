"""One Gated DeltaNet layer's inference state for a batch of rows: the last K-1 pre-convolution inputs and the
recurrent state, constant size whatever the context length (cache.HybridCache holds one per such layer)."""

from __future__ import annotations

import torch


class DeltaNetState:
    """conv [B, K-1, conv_dim] (model dtype) and recurrent [B, Hv, Dk, Dv] (fp32) of one Gated DeltaNet
    layer. Layers assign new tensors here; the one exception, a decode step updating `recurrent` in place, is
    taken only while nothing else refers to that tensor (ops/layer_decode.exclusive), so snapshots stay as taken."""

    def __init__(self, conv: torch.Tensor, recurrent: torch.Tensor):
        self.conv, self.recurrent = conv, recurrent
        # Speculative verification (HybridCache.keep_steps): a forward of T tokens also leaves the state after
        # each of them here, steps = ([conv after token t], [recurrent after token t]), so the cache can land
        # on any of the T positions (HybridCache.rewind) without running a token again.
        self.keep_steps = False
        self.steps: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    @classmethod
    def zeros(cls, batch_size: int, conv_dim: int, kernel_size: int, num_heads: int, key_dim: int,
              value_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> DeltaNetState:
        return cls(torch.zeros(batch_size, kernel_size - 1, conv_dim, dtype=dtype, device=device),
                   torch.zeros(batch_size, num_heads, key_dim, value_dim, dtype=torch.float32, device=device))

    def take(self, convs: list[torch.Tensor], recs: list[torch.Tensor]) -> None:
        """The state after a whole-layer kernel ran T tokens and returned the state after each of them
        (decode_gdn_layer, decode_stack): the last one is the state, and all T are kept where keep_steps asks."""
        self.conv, self.recurrent = convs[-1], recs[-1]
        if self.keep_steps:
            self.steps = (convs, recs)

    @property
    def nbytes(self) -> int:
        return self.conv.numel() * self.conv.element_size() + self.recurrent.numel() * 4
