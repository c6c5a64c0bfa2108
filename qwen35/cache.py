"""Caller-owned inference state: one object per layer, wrapped in a HybridCache.

- KVCache (gated-attention layers): keys and values [B, Hkv, S, D], grown in steps, never preallocated
  to the maximum context.
- DeltaNetState (Gated DeltaNet layers): the last K-1 pre-convolution inputs [B, K-1, conv_dim] and the
  recurrent state [B, Hv, Dk, Dv] in fp32. Constant size, whatever the context length.

The model never owns state: `model.make_cache(batch_size)` builds one, the caller passes it to every
forward, and `snapshot()` / `restore()` return it to an exact token position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KV_GROWTH_STEP = 256  # tokens added per reallocation; amortised growth without a max-context buffer


class KVCache:
    def __init__(self, batch_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.batch_size, self.num_kv_heads, self.head_dim = batch_size, num_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0

    @property
    def capacity(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def _reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        cap = max(needed, self.capacity * 2 if self.capacity else 0)
        cap = -(-cap // KV_GROWTH_STEP) * KV_GROWTH_STEP
        shape = (self.batch_size, self.num_kv_heads, cap, self.head_dim)
        k = torch.empty(shape, dtype=self.dtype, device=self.device)
        v = torch.empty(shape, dtype=self.dtype, device=self.device)
        if self.length:
            k[:, :, : self.length] = self.k[:, :, : self.length]
            v[:, :, : self.length] = self.v[:, :, : self.length]
        self.k, self.v = k, v

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v [B, Hkv, T, D]; return views of all keys and values [B, Hkv, length, D]."""
        T = k.shape[2]
        self._reserve(self.length + T)
        self.k[:, :, self.length : self.length + T] = k
        self.v[:, :, self.length : self.length + T] = v
        self.length += T
        return self.k[:, :, : self.length], self.v[:, :, : self.length]

    @property
    def nbytes(self) -> int:
        return 0 if self.k is None else 2 * self.k[:, :, : self.length].numel() * self.k.element_size()

    def snapshot(self) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
        if self.k is None:
            return (0, None, None)
        return (self.length, self.k[:, :, : self.length].clone(), self.v[:, :, : self.length].clone())

    def restore(self, snap: tuple[int, torch.Tensor | None, torch.Tensor | None]) -> None:
        length, k, v = snap
        self.length = 0
        if length:
            self.update(k, v)


class DeltaNetState:
    def __init__(self, batch_size: int, conv_dim: int, kernel_size: int, num_heads: int, key_dim: int,
                 value_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.conv = torch.zeros(batch_size, kernel_size - 1, conv_dim, dtype=dtype, device=device)
        self.recurrent = torch.zeros(batch_size, num_heads, key_dim, value_dim, dtype=torch.float32,
                                     device=device)

    @property
    def nbytes(self) -> int:
        return self.conv.numel() * self.conv.element_size() + self.recurrent.numel() * 4

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.conv.clone(), self.recurrent.clone()

    def restore(self, snap: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.conv, self.recurrent = snap[0].clone(), snap[1].clone()


@dataclass(frozen=True)
class CacheSnapshot:
    offset: int
    layers: tuple


class HybridCache:
    """Per-layer state for one batch of sequences, plus `offset`: the tokens seen so far."""

    def __init__(self, layers: list[KVCache | DeltaNetState], batch_size: int):
        self.layers = layers
        self.batch_size = batch_size
        self.offset = 0

    def __getitem__(self, i: int) -> KVCache | DeltaNetState:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def snapshot(self) -> CacheSnapshot:
        """An independent copy of the state at the current position."""
        return CacheSnapshot(self.offset, tuple(layer.snapshot() for layer in self.layers))

    def restore(self, snap: CacheSnapshot) -> None:
        """Return to the position of `snap`; the snapshot stays usable for later restores."""
        if len(snap.layers) != len(self.layers):
            raise ValueError(f"snapshot has {len(snap.layers)} layers, cache has {len(self.layers)}")
        for layer, s in zip(self.layers, snap.layers):
            layer.restore(s)
        self.offset = snap.offset
