"""Caller-owned inference state: one object per layer, wrapped in a HybridCache.

- KVCache (gated-attention layers): keys and values [B, Hkv, S, D] in a buffer grown in steps, never
  preallocated to the maximum context.
- DeltaNetState (Gated DeltaNet layers): the last K-1 pre-convolution inputs [B, K-1, conv_dim] and the
  recurrent state [B, Hv, Dk, Dv] in fp32. Constant size, whatever the context length.

The model never owns state: `model.make_cache(batch_size)` builds one, the caller passes it to every
forward, and `snapshot()` / `restore()` return it to an exact token position.

Snapshots are cheap enough for every turn boundary: Gated DeltaNet state is copied (constant size) and
KV is cut by length — a snapshot keeps a reference to the KV buffer and pins its first `length` tokens.
A later write below a live snapshot's pin (after restoring an earlier position and diverging) first
copies the buffer, so no snapshot ever sees its tokens overwritten.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

KV_GROWTH_STEP = 256  # tokens added per reallocation; amortised growth without a max-context buffer


class _KVBuffer:
    """Storage shared between a KVCache and the snapshots taken from it."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v
        self._pins: list[weakref.ref] = []

    def pin(self, owner: object, length: int) -> None:
        owner._pin_length = length  # type: ignore[attr-defined]
        self._pins.append(weakref.ref(owner))

    def pinned_length(self) -> int:
        """Longest prefix some live snapshot relies on."""
        live = [(r, r()) for r in self._pins]
        self._pins = [r for r, o in live if o is not None]
        return max((o._pin_length for _, o in live if o is not None), default=0)


class KVSnapshot:
    __slots__ = ("length", "buffer", "_pin_length", "__weakref__")

    def __init__(self, length: int, buffer: _KVBuffer | None):
        self.length, self.buffer = length, buffer
        if buffer is not None:
            buffer.pin(self, length)


class KVCache:
    def __init__(self, batch_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.batch_size, self.num_kv_heads, self.head_dim = batch_size, num_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.buffer: _KVBuffer | None = None
        self.length = 0

    @property
    def capacity(self) -> int:
        return 0 if self.buffer is None else self.buffer.k.shape[2]

    def _writable(self, needed: int) -> _KVBuffer:
        """A buffer that holds `needed` tokens and may be written from `self.length` on."""
        buf = self.buffer
        shared = buf is not None and buf.pinned_length() > self.length
        if buf is not None and needed <= self.capacity and not shared:
            return buf
        cap = max(needed, self.capacity * 2 if needed > self.capacity else self.capacity)
        cap = -(-cap // KV_GROWTH_STEP) * KV_GROWTH_STEP
        shape = (self.batch_size, self.num_kv_heads, cap, self.head_dim)
        new = _KVBuffer(torch.empty(shape, dtype=self.dtype, device=self.device),
                        torch.empty(shape, dtype=self.dtype, device=self.device))
        if self.length:
            new.k[:, :, : self.length] = buf.k[:, :, : self.length]
            new.v[:, :, : self.length] = buf.v[:, :, : self.length]
        self.buffer = new
        return new

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v [B, Hkv, T, D]; return views of all keys and values [B, Hkv, length, D]."""
        T = k.shape[2]
        buf = self._writable(self.length + T)
        buf.k[:, :, self.length : self.length + T] = k
        buf.v[:, :, self.length : self.length + T] = v
        self.length += T
        return buf.k[:, :, : self.length], buf.v[:, :, : self.length]

    @property
    def nbytes(self) -> int:
        """Bytes of the tokens held (not of spare capacity)."""
        return 2 * self.batch_size * self.num_kv_heads * self.length * self.head_dim * self.dtype.itemsize

    @property
    def allocated_bytes(self) -> int:
        return 2 * self.batch_size * self.num_kv_heads * self.capacity * self.head_dim * self.dtype.itemsize

    def snapshot(self) -> KVSnapshot:
        return KVSnapshot(self.length, self.buffer)

    def restore(self, snap: KVSnapshot) -> None:
        self.buffer, self.length = snap.buffer, snap.length


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
        # The layers replace these tensors rather than writing into them, so references are enough.
        return self.conv, self.recurrent

    def restore(self, snap: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.conv, self.recurrent = snap


@dataclass(frozen=True)
class CacheSnapshot:
    offset: int
    pad: torch.Tensor | None
    layers: tuple

    @property
    def nbytes(self) -> int:
        """Memory this snapshot keeps alive: its KV prefix and its Gated DeltaNet state."""
        total = 0
        for s in self.layers:
            if isinstance(s, KVSnapshot):
                if s.buffer is not None:
                    per_token = 2 * s.buffer.k[:, :, :1].numel() * s.buffer.k.element_size()
                    total += per_token * s.length
            else:
                total += sum(t.numel() * t.element_size() for t in s)
        return total


class HybridCache:
    """Per-layer state for one batch of sequences.

    offset: tokens processed so far (including left padding).
    pad: None, or LongTensor [B] of left-padding tokens per sequence (batched prompts of different
         lengths); padded positions are masked out of attention and never enter the Gated DeltaNet state.
    """

    def __init__(self, layers: list[KVCache | DeltaNetState], batch_size: int):
        self.layers = layers
        self.batch_size = batch_size
        self.offset = 0
        self.pad: torch.Tensor | None = None

    def __getitem__(self, i: int) -> KVCache | DeltaNetState:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def snapshot(self) -> CacheSnapshot:
        """The state at the current position; O(1) for KV, a reference swap for Gated DeltaNet."""
        return CacheSnapshot(self.offset, self.pad, tuple(layer.snapshot() for layer in self.layers))

    def restore(self, snap: CacheSnapshot) -> None:
        """Return to the position of `snap`; the snapshot stays usable for later restores."""
        if len(snap.layers) != len(self.layers):
            raise ValueError(f"snapshot has {len(snap.layers)} layers, cache has {len(self.layers)}")
        for layer, s in zip(self.layers, snap.layers):
            layer.restore(s)
        self.offset, self.pad = snap.offset, snap.pad
