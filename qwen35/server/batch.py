"""A decode batch whose sequences join and leave between steps (continuous batching).

All rows share one HybridCache. Rows end at the same slot (`offset`) and start at different ones: row b's
tokens occupy slots pad[b]..offset-1, the slots before pad[b] are masked out of attention and never touch
its own Gated DeltaNet state (every row has its own conv and recurrent state). A sequence is prefilled
alone (so prompt reuse works on it), then merged in: if its prompt is longer than the batch, the other
rows' KV moves right to make room. A finished row is removed by dropping its index from every tensor.
"""

from __future__ import annotations

import torch

from ..cache import DeltaNetState, HybridCache, KVCache


def _kv_layers(cache: HybridCache) -> list[KVCache]:
    return [layer for layer in cache.layers if isinstance(layer, KVCache)]


def merge(batch: HybridCache | None, single: HybridCache) -> HybridCache:
    """A new batch cache holding the rows of `batch` (may be None) and then the one row of `single`."""
    if single.batch_size != 1 or single.pad is not None:
        raise ValueError("merge takes a batch-1 cache without padding")
    if batch is None:
        # the single cache's KV buffers are reused: the batch only writes past the prompt, where no
        # snapshot of it is pinned
        out = HybridCache(list(single.layers), 1)
        out.offset, out.pad = single.offset, torch.zeros(1, dtype=torch.long)
        return out
    O, L = batch.offset, single.offset
    new_offset = max(O, L)
    shift = new_offset - O  # existing rows move right by this
    B = batch.batch_size
    pad = torch.cat([batch.pad + shift, torch.tensor([new_offset - L])])
    layers = []
    for old, one in zip(batch.layers, single.layers):
        if isinstance(old, KVCache):
            kv = KVCache(B + 1, old.num_kv_heads, old.head_dim, old.dtype, old.device)
            buf = kv._writable(new_offset)
            buf.k[:B, :, shift : shift + O] = old.buffer.k[:, :, :O]
            buf.v[:B, :, shift : shift + O] = old.buffer.v[:, :, :O]
            buf.k[B:, :, new_offset - L : new_offset] = one.buffer.k[:, :, :L]
            buf.v[B:, :, new_offset - L : new_offset] = one.buffer.v[:, :, :L]
            if shift:
                buf.k[:B, :, :shift] = 0
                buf.v[:B, :, :shift] = 0
            if new_offset - L:
                buf.k[B:, :, : new_offset - L] = 0
                buf.v[B:, :, : new_offset - L] = 0
            kv.length = new_offset
            layers.append(kv)
        else:
            st = DeltaNetState.__new__(DeltaNetState)
            st.conv = torch.cat([old.conv, one.conv.to(old.conv.dtype)])
            st.recurrent = torch.cat([old.recurrent, one.recurrent])
            layers.append(st)
    out = HybridCache(layers, B + 1)
    out.offset, out.pad = new_offset, pad
    return out


def remove(batch: HybridCache, keep: list[int]) -> HybridCache | None:
    """The batch restricted to rows `keep` (None when empty); leading slots no row uses are dropped."""
    if not keep:
        return None
    idx = torch.tensor(keep, dtype=torch.long)
    pad = batch.pad[idx]
    trim = int(pad.min())
    layers = []
    for layer in batch.layers:
        if isinstance(layer, KVCache):
            kv = KVCache(len(keep), layer.num_kv_heads, layer.head_dim, layer.dtype, layer.device)
            n = batch.offset - trim
            buf = kv._writable(n)
            buf.k[:, :, :n] = layer.buffer.k[idx, :, trim : batch.offset]
            buf.v[:, :, :n] = layer.buffer.v[idx, :, trim : batch.offset]
            kv.length = n
            layers.append(kv)
        else:
            st = DeltaNetState.__new__(DeltaNetState)
            st.conv, st.recurrent = layer.conv[idx], layer.recurrent[idx]
            layers.append(st)
    out = HybridCache(layers, len(keep))
    out.offset, out.pad = batch.offset - trim, pad - trim
    return out
