"""Caller-owned inference state for a batch of sequences (rows): the contract every consumer uses.

Per row (`Row`): its length (tokens held: the one position counter), its rotary position offset (with
images in a prompt, M-RoPE positions advance by the image grid, not by the token count), and one KV
buffer per gated-attention layer ([Hkv, capacity, D] keys and values in the cache's format, kv_storage.py:
the model's dtype or q8_0 blocks; grown in steps, never preallocated to the maximum context). Per Gated
DeltaNet layer (`DeltaNetState`), for all rows together: the last K-1 pre-convolution inputs
[B, K-1, conv_dim] and the recurrent state [B, Hv, Dk, Dv] in fp32 (whatever the KV format), constant size
whatever the context length.

Rows do not move: a row joining a batch (`HybridCache.merge`) or leaving it (`filter`) never copies
another row's KV, so a join costs the same whether the other rows hold 10 tokens or 100K; attention reads
each row over its own length. Only the Gated DeltaNet states (constant size per row) are concatenated.

Snapshots (`snapshot()` / `restore()`) return a cache to an exact token position in O(1): Gated DeltaNet
state by reference, KV by length. A layer writes a new state tensor whenever anything else refers to the old
one (a snapshot, kept steps, a caller's variable, a view: tested); only a recurrent state that nothing but its
DeltaNetState holds is updated in place by a decode step (ops/layer_decode.exclusive, 1.03x a token).
A snapshot, like a row, *holds* the first `length` tokens of each buffer it references; a write into a
buffer below what any other holder holds first copies the buffer (copy-on-write), so no snapshot or
other row ever sees its tokens overwritten, and a row rolled back onto its own snapshot writes in place.
A buffer that grows while no other holder relies on tokens past the growing row's takes its holders along
(new storage, same buffer), so a conversation restored turn after turn keeps one buffer for all its
snapshots; a snapshot keeps its buffers whole, and `trim` frees the room a finished row reserved and never
used.

One file past ~300 lines on purpose: rows, buffers, snapshots and the batch operations are one contract
whose invariants (who holds which prefix) only read right side by side.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .deltanet_state import DeltaNetState
from .errors import Qwen35Error
from .kv_storage import KVBuffer, buffer_class, check_kv_cache, kv_bytes_per_token

KV_GROWTH_STEP = 256  # tokens added per reallocation; amortised growth without a max-context buffer


class CacheError(Qwen35Error, ValueError):
    """A cache operation got arguments it cannot honour (rows out of range, mismatched layouts)."""


class Row:
    """One sequence: `length` tokens held, rotary offset `rope_delta`, one KV buffer per attention layer."""

    __slots__ = ("__weakref__", "kv", "length", "rope_delta")

    def __init__(self, num_attention_layers: int, length: int = 0, rope_delta: int = 0,
                 kv: Sequence[KVBuffer | None] | None = None):
        self.length, self.rope_delta = length, rope_delta
        self.kv: list[KVBuffer | None] = list(kv) if kv is not None else [None] * num_attention_layers
        for buf in self.kv:
            if buf is not None:
                buf.holders.add(self)

    def shared_past(self, buf: KVBuffer) -> bool:
        """Whether another holder of `buf` relies on its slots from this row's length on (this row must copy
        before it writes). Two rows restored from one snapshot hold one buffer at one length: written in place,
        the second row's token overwrote the first's (batch rows 0.26 off a lone row's logits; a seeded
        distribution test failed once growth moved holders along). A row behind this one copies when it
        writes (this one is past it)."""
        return any(h is not self and (h.length > self.length or (h.length == self.length and isinstance(h, Row)))
                   for h in list(buf.holders))

    def writable(self, j: int, needed: int, make: Callable[[int], KVBuffer], exact: bool = False,
                 limit: int | None = None) -> KVBuffer:
        """Row's buffer of attention layer j, able to hold `needed` tokens and be written from `length` on:
        grown (doubling, in KV_GROWTH_STEP units, never past `limit`, the model's context, unless `needed`
        is; exact: to `needed` rounded up to that unit; in place: its holders follow it to the new storage)
        or copied when another holder relies on tokens past `length`, or another row stands at `length` too
        (it would write the same slots). make(capacity): an empty buffer of the cache's format."""
        buf = self.kv[j]
        shared_past = buf is not None and self.shared_past(buf)
        if buf is not None and needed <= buf.capacity and not shared_past:
            return buf
        old_cap = 0 if buf is None else buf.capacity
        cap = needed if exact else max(needed, 2 * old_cap if needed > old_cap else old_cap)
        cap = -(-cap // KV_GROWTH_STEP) * KV_GROWTH_STEP
        if limit is not None and needed <= limit:
            cap = min(cap, limit)  # (past the context, a caller's own loop: still doubling, never +1 a token)
        new = make(cap)
        if self.length and buf is not None:
            new.copy_prefix(buf, self.length)
        if buf is not None and not shared_past:
            # grown in place: its other holders rely on no token past ours, so they move to the new storage
            # with it and the old one is freed; a conversation's snapshots share one buffer, not one per turn
            buf.take_storage(new)
            return buf
        if buf is not None:
            buf.holders.discard(self)
        new.holders.add(self)
        self.kv[j] = new
        return new


class RowSnapshot:
    """A row frozen at `length`: holds that prefix of each of its KV buffers."""

    __slots__ = ("__weakref__", "kv", "length", "rope_delta")

    def __init__(self, row: Row):
        self.length, self.rope_delta, self.kv = row.length, row.rope_delta, tuple(row.kv)
        for buf in self.kv:
            if buf is not None:
                buf.holders.add(self)

    @property
    def nbytes(self) -> int:
        """Bytes of the tokens it holds. The buffers it keeps alive may be larger (room a row reserved) and
        shared (other snapshots of the same row): prompt_cache.py counts those, each once."""
        return sum(b.token_bytes * self.length for b in self.kv if b is not None)


def trim_buffer(buf: KVBuffer, ended: Row | None = None) -> None:
    """Free the room of `buf` past the longest prefix any holder keeps unless a row other than `ended` (a
    row that will write no more) still holds it: a live row writes into its reserved room without growing,
    which the server's memory budget counted for its request. Otherwise a snapshot of a finished request
    would keep the room reserved for its max_tokens alive for as long as it is cached. Cut to the exact
    length, not to a KV_GROWTH_STEP: a row restored from it that writes copies the prefix anyway, and a
    step's spare slots would outweigh a short conversation."""
    holders = list(buf.holders)
    if any(isinstance(h, Row) and h is not ended for h in holders):
        return
    buf.shrink(max((h.length for h in holders), default=0))


class RowList:
    """A cache's rows, shared with its KVCache views. The views read the rows through this, not through the
    HybridCache: a view referring back to its cache would make a reference cycle, and a dropped cache (a
    finished request's) would then keep its rows, and their holds on buffers, until the garbage collector
    ran, so a snapshot's buffer could not be trimmed (trim_buffer) when the request ended."""

    __slots__ = ("rows",)

    def __init__(self, rows: list[Row]):
        self.rows = rows


class KVCache:
    """The view of one attention layer (index j among the attention layers) on a cache's rows."""

    def __init__(self, rows: RowList, j: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, kv_cache: str = "bf16", max_tokens: int | None = None):
        self.row_list, self.j, self.max_tokens = rows, j, max_tokens
        self.num_kv_heads, self.head_dim, self.dtype, self.device = num_kv_heads, head_dim, dtype, device
        self.kv_cache, self._buffer = kv_cache, buffer_class(kv_cache)
        # a speculative verify (HybridCache.keep_steps): each of a forward's tokens attends as its decode step would
        self.keep_steps = False

    @property
    def rows(self) -> list[Row]:
        return self.row_list.rows

    @property
    def nbytes(self) -> int:
        """Bytes of the keys and values held by this layer (not of spare capacity)."""
        per_token = kv_bytes_per_token(self.kv_cache, self.num_kv_heads, self.head_dim, self.dtype)
        return per_token * sum(r.length for r in self.rows)

    def _make(self, capacity: int) -> KVBuffer:
        # a normal tensor even when a forward runs under torch.inference_mode(): a buffer made there would be
        # an inference tensor, which a later write outside that mode (generate_step runs under no_grad)
        # refuses, so a prompt prefilled in inference mode could not be continued
        with torch.inference_mode(False):
            return self._buffer.empty(self.num_kv_heads, capacity, self.head_dim, self.dtype, self.device)

    def buffers(self, new_tokens: int, exact: bool = False) -> list[KVBuffer]:
        """Each row's buffer, writable for `new_tokens` tokens from the row's length on."""
        return [r.writable(self.j, r.length + new_tokens, self._make, exact, self.max_tokens) for r in self.rows]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> list[KVBuffer]:
        """Write k, v [B, Hkv, T, D] after each row's tokens (quantized on write for q8_0); return each row's
        buffer. Row lengths advance when the whole forward ends."""
        T = k.shape[2]
        bufs = self.buffers(T)
        for b, (row, buf) in enumerate(zip(self.rows, bufs)):
            buf.write(row.length, k[b], v[b])
        return bufs

    def update(self, k: torch.Tensor, v: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`append`, then return per row all its keys and values [1, Hkv, length + T, D] in the model's
        dtype (views for bf16; dequantized copies for q8_0: the reference path, which attention over a q8_0
        cache does not take, as it would expand the whole prefix: model/attention.py _attend_q8)."""
        T = k.shape[2]
        out = []
        for row, buf in zip(self.rows, self.append(k, v)):
            kb, vb = buf.read(row.length + T, self.dtype)
            out.append((kb[None], vb[None]))
        return out


class CacheSnapshot:
    """The state of some rows at their current positions; restorable any number of times."""

    __slots__ = ("deltanet", "rows")

    def __init__(self, rows: tuple[RowSnapshot, ...], deltanet: tuple[tuple[torch.Tensor, torch.Tensor], ...]):
        self.rows, self.deltanet = rows, deltanet

    @property
    def offset(self) -> int:
        return _common_length([r.length for r in self.rows])

    @property
    def nbytes(self) -> int:
        """Bytes of its KV prefixes and its Gated DeltaNet state (RowSnapshot.nbytes says what this leaves
        out)."""
        return sum(r.nbytes for r in self.rows) + sum(c.numel() * c.element_size() + s.numel() * 4
                                                       for c, s in self.deltanet)


def _common_length(lengths: list[int]) -> int:
    if len(set(lengths)) > 1:
        raise CacheError(f"rows hold different numbers of tokens {lengths}: use .lengths")
    return lengths[0] if lengths else 0


class CacheLayout:
    """What a model's cache looks like: layer types and the shapes of their state (from ModelConfig)."""

    def __init__(self, layer_types: Sequence[str], num_kv_heads: int, head_dim: int, conv_dim: int = 0,
                 kernel_size: int = 1, num_v_heads: int = 0, key_dim: int = 0, value_dim: int = 0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 kv_cache: str = "bf16", max_tokens: int | None = None):
        self.layer_types = tuple(layer_types)
        # the model's context: no KV buffer grows past it (doubling from 196K would ask for 393K slots)
        self.max_tokens = max_tokens
        # storage of the attention layers' keys and values; a blocked format must split head_dim into its blocks
        self.kv_cache = check_kv_cache(kv_cache, head_dim if "full_attention" in self.layer_types else None)
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.conv_dim, self.kernel_size = conv_dim, kernel_size
        self.num_v_heads, self.key_dim, self.value_dim = num_v_heads, key_dim, value_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.num_attention = sum(t == "full_attention" for t in self.layer_types)
        self.num_deltanet = len(self.layer_types) - self.num_attention

    def empty_deltanet(self, batch_size: int) -> list[DeltaNetState]:
        return [DeltaNetState.zeros(batch_size, self.conv_dim, self.kernel_size, self.num_v_heads, self.key_dim,
                                    self.value_dim, self.dtype, self.device) for _ in range(self.num_deltanet)]


class HybridCache:
    """Per-layer state of a batch of rows. `layers[i]` is what decoder layer i reads and advances: a
    KVCache view (attention) or a DeltaNetState. Rows advance together by each forward's T tokens."""

    def __init__(self, layout: CacheLayout, rows: list[Row], deltanet: list[DeltaNetState]):
        self.layout, self.row_list, self.deltanet = layout, RowList(rows), deltanet
        self.last_forward = 0  # tokens per row of the last forward (what `rewind` may take back); 0: none
        # why a forward stopped part-way through this cache (an exception, Ctrl-C), or None: its layers may
        # then hold the new tokens' state while its rows' lengths do not, so it is refused until restored
        self.interrupted: str | None = None
        self.layers: list[KVCache | DeltaNetState] = []
        j = d = 0
        for t in layout.layer_types:
            if t == "full_attention":
                self.layers.append(KVCache(self.row_list, j, layout.num_kv_heads, layout.head_dim, layout.dtype,
                                           layout.device, layout.kv_cache, layout.max_tokens))
                j += 1
            else:
                self.layers.append(deltanet[d])
                d += 1

    @classmethod
    def empty(cls, layout: CacheLayout, batch_size: int = 1) -> HybridCache:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
            raise CacheError(f"batch_size must be an integer >= 0, got {batch_size!r}")
        return cls(layout, [Row(layout.num_attention) for _ in range(batch_size)], layout.empty_deltanet(batch_size))

    @classmethod
    def from_tensors(cls, layout: CacheLayout, states: Sequence, lengths: Sequence[int] | None = None,
                     rope_deltas: Sequence[int] | None = None) -> HybridCache:
        """A cache holding given state, one entry per layer: (k, v) [B, Hkv, S, D] for attention layers,
        (conv [B, K-1, C], recurrent [B, Hv, Dk, Dv]) for Gated DeltaNet layers. lengths: tokens per row
        (default S of the first attention layer, else 0); the KV beyond a row's length is ignored."""
        if len(states) != len(layout.layer_types):
            raise CacheError(f"{len(states)} layer states given for {len(layout.layer_types)} layers")
        B = states[0][0].shape[0] if states else 0
        kv = [s for s, t in zip(states, layout.layer_types) if t == "full_attention"]
        if lengths is None:
            lengths = [kv[0][0].shape[2] if kv else 0] * B
        rows = []
        for b in range(B):
            bufs = []
            for k, v in kv:
                if k.shape[2] < lengths[b]:
                    raise CacheError(f"row {b} holds {lengths[b]} tokens but its keys have {k.shape[2]}")
                bufs.append(buffer_class(layout.kv_cache).from_values(k[b], v[b], layout.dtype))
            rows.append(Row(layout.num_attention, int(lengths[b]), int(rope_deltas[b]) if rope_deltas else 0, bufs))
        dn = [DeltaNetState(c.to(layout.dtype), r.float()) for (c, r), t in zip(states, layout.layer_types)
              if t != "full_attention"]
        return cls(layout, rows, dn)

    @property
    def rows(self) -> list[Row]:
        return self.row_list.rows

    @rows.setter
    def rows(self, rows: list[Row]) -> None:
        self.row_list.rows = rows

    def __getitem__(self, i: int) -> KVCache | DeltaNetState:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    @property
    def lengths(self) -> list[int]:
        """Tokens held by each row (the position counter)."""
        return [r.length for r in self.rows]

    @property
    def offset(self) -> int:
        """Tokens held, when every row holds the same number (always true for batch 1)."""
        return _common_length(self.lengths)

    def positions(self, T: int) -> torch.Tensor:
        """Rotary positions [B, T] of the next T tokens of each row."""
        starts = [r.length + r.rope_delta for r in self.rows]
        if len(starts) * T <= 64:  # a decode step: one small op instead of three (each ~30 us once caches are cold)
            return torch.tensor([[s + t for t in range(T)] for s in starts], device=self.layout.device)
        return torch.tensor(starts, device=self.layout.device)[:, None] + torch.arange(T, device=self.layout.device)

    def mark_interrupted(self, why: str) -> None:
        """A forward stopped part-way through (the model calls this as the exception passes)."""
        self.interrupted = why

    def check_usable(self) -> None:
        if self.interrupted is not None:
            raise CacheError(f"this cache was left part-way through a forward ({self.interrupted}), so its state is "
                             "not exact: restore a snapshot taken before, or make a new cache")

    def advance(self, T: int) -> None:
        """Every row now holds T more tokens (called once per forward, after all layers wrote them)."""
        for r in self.rows:
            r.length += T
        self.last_forward = T

    def keep_steps(self, on: bool = True) -> None:
        """From now on (until off), forwards leave each Gated DeltaNet layer's state after every token they
        process, for `rewind`, and attention layers compute each token as its own decode step (a verify must
        give plain decoding's logits where no whole-layer kernel runs it: model/attention.py)."""
        for s in self.deltanet:
            s.keep_steps, s.steps = on, None
        for layer in self.layers:
            if isinstance(layer, KVCache):
                layer.keep_steps = on

    def rewind(self, keep: Sequence[int]) -> None:
        """After the last forward (T tokens per row; with `keep_steps` if the model has Gated DeltaNet
        layers): row b keeps only the first keep[b] (1..T) of those tokens, as if it had never seen the rest.
        Its length is cut (the KV past it is dead: the next write goes over it) and each Gated DeltaNet
        layer's state becomes the one that forward left after token keep[b]. Nothing is recomputed."""
        keep, T = list(keep), self.last_forward
        if len(keep) != self.batch_size:
            raise CacheError(f"rewind: {len(keep)} counts for {self.batch_size} rows")
        if not T or not all(1 <= n <= T for n in keep):
            raise CacheError(f"rewind: each row keeps 1..{T} of the last forward's tokens, got {keep}")
        for s in self.deltanet:
            if s.steps is None or len(s.steps[0]) != T:
                raise CacheError("rewind: the last forward kept no per-token states (call keep_steps first)")
        for s in self.deltanet:
            convs, recs = s.steps
            if len(set(keep)) == 1:
                s.conv, s.recurrent = convs[keep[0] - 1], recs[keep[0] - 1]
            else:
                s.conv = torch.stack([convs[n - 1][b] for b, n in enumerate(keep)])
                s.recurrent = torch.stack([recs[n - 1][b] for b, n in enumerate(keep)])
            s.steps = None
        for r, n in zip(self.rows, keep):
            r.length -= T - n
        self.last_forward = 0

    def truncate(self, lengths: Sequence[int]) -> None:
        """Cut each row back to lengths[b] tokens (never forward). Attention-only caches (the MTP head's):
        a Gated DeltaNet state cannot be cut by length (use `rewind`)."""
        if self.layout.num_deltanet:
            raise CacheError("truncate: Gated DeltaNet state cannot be cut by length; use keep_steps + rewind")
        lengths = list(lengths)
        if len(lengths) != self.batch_size or any(not 0 <= n <= r.length for n, r in zip(lengths, self.rows)):
            raise CacheError(f"truncate: lengths {lengths} for rows holding {self.lengths}")
        for r, n in zip(self.rows, lengths):
            r.length = n
        self.last_forward = 0

    def reserve(self, n: int, exact: bool = False) -> None:
        """Make room for n more tokens per row now, so the next forwards of up to n tokens allocate and
        copy nothing (speculative verification, a known generation length). exact: a buffer that must grow
        gets just that room (rounded up to KV_GROWTH_STEP), not double its old size: what the server's
        memory budget counts for a request's whole prompt + max_tokens."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise CacheError(f"reserve takes a number of tokens >= 0, got {n!r}")
        for layer in self.layers:
            if isinstance(layer, KVCache):
                layer.buffers(n, exact)

    @property
    def room(self) -> int:
        """Tokens every row can still take before a KV buffer must grow (or be copied: a shared one counts
        as full); a large number for a model without attention layers (its rows hold no buffers)."""
        return min((0 if b is None or r.shared_past(b) else b.capacity - r.length for r in self.rows for b in r.kv),
                   default=2**62)

    @property
    def nbytes(self) -> int:
        """Bytes of the tokens held (not of spare capacity) plus the Gated DeltaNet state."""
        L = self.layout
        per_token = kv_bytes_per_token(L.kv_cache, L.num_kv_heads, L.head_dim, L.dtype)
        kv = per_token * L.num_attention * sum(self.lengths)
        return kv + sum(s.nbytes for s in self.deltanet)

    @property
    def allocated_bytes(self) -> int:
        kv = sum(b.allocated_bytes for r in self.rows for b in r.kv if b is not None)
        return kv + sum(s.nbytes for s in self.deltanet)

    # -- snapshots ---------------------------------------------------------------------------------

    def snapshot(self, rows: Sequence[int] | None = None) -> CacheSnapshot:
        """The state of `rows` (default all) at their current positions: O(1) per row."""
        self.check_usable()
        idx = list(range(self.batch_size)) if rows is None else self._check_rows(rows, repeat=True)
        if rows is None:
            dn = tuple((s.conv, s.recurrent) for s in self.deltanet)
        else:
            t = torch.tensor(idx, dtype=torch.long, device=self.layout.device)
            dn = tuple((s.conv.index_select(0, t), s.recurrent.index_select(0, t)) for s in self.deltanet)
        return CacheSnapshot(tuple(RowSnapshot(self.rows[i]) for i in idx), dn)

    def restore(self, snap: CacheSnapshot) -> None:
        """Return to `snap` (its rows replace this cache's rows; the batch size becomes the snapshot's).
        The snapshot stays usable for later restores. Restoring also ends an interrupted forward's hold."""
        if not isinstance(snap, CacheSnapshot):
            raise CacheError(f"restore takes a CacheSnapshot (cache.snapshot()), got {type(snap).__name__}")
        if len(snap.deltanet) != self.layout.num_deltanet or any(
                len(r.kv) != self.layout.num_attention for r in snap.rows):
            raise CacheError(f"snapshot does not fit this cache's layout ({self.layout.num_deltanet} Gated "
                             f"DeltaNet and {self.layout.num_attention} attention layers)")
        self._check_state_shapes([(c, r) for c, r in snap.deltanet], "snapshot")
        formats = {b.format for r in snap.rows for b in r.kv if b is not None}
        if formats - {self.layout.kv_cache}:
            raise CacheError(f"snapshot holds a {'/'.join(sorted(formats))} KV cache; this cache stores "
                             f"{self.layout.kv_cache}")
        self.rows = [Row(self.layout.num_attention, r.length, r.rope_delta, r.kv) for r in snap.rows]
        for state, (conv, rec) in zip(self.deltanet, snap.deltanet):
            state.conv, state.recurrent, state.steps = conv, rec, None
        self.last_forward = 0
        self.interrupted = None

    def _check_state_shapes(self, states, what: str) -> None:
        """Gated DeltaNet states [(conv, recurrent)] must be this layout's (another model's fail deep in torch)."""
        L = self.layout
        conv_shape = (L.kernel_size - 1, L.conv_dim)
        rec_shape = (L.num_v_heads, L.key_dim, L.value_dim)
        for conv, rec in states:
            if tuple(conv.shape[1:]) != conv_shape or tuple(rec.shape[1:]) != rec_shape or conv.dtype != L.dtype:
                raise CacheError(f"{what} holds Gated DeltaNet state of another model (conv {list(conv.shape[1:])} "
                                 f"{conv.dtype}, recurrent {list(rec.shape[1:])}; this cache's are {list(conv_shape)} "
                                 f"{L.dtype}, {list(rec_shape)})")

    def trim(self, rows: Sequence[int]) -> None:
        """`rows` will write no more (a finished request's, about to leave the batch): free the room their
        buffers hold past the longest prefix any holder keeps, where no other row writes into it
        (trim_buffer). Snapshots keep their prefixes; such a row written again would first grow (copy) its
        buffers."""
        for i in self._check_rows(rows):
            for buf in self.rows[i].kv:
                if buf is not None:
                    trim_buffer(buf, ended=self.rows[i])

    # -- batching ----------------------------------------------------------------------------------

    def _check_rows(self, rows: Sequence[int], repeat: bool = False) -> list[int]:
        """Row indices: integers in range; a row twice only where `repeat` (a snapshot may copy one)."""
        idx = list(rows)
        if any(isinstance(i, bool) or not isinstance(i, (int, torch.Tensor)) for i in idx):
            raise CacheError(f"rows must be integers, got {idx}")
        idx = [int(i) for i in idx]
        bad = [i for i in idx if not 0 <= i < self.batch_size]
        if bad:
            raise CacheError(f"rows {bad} out of range for a batch of {self.batch_size}")
        if not repeat and len(set(idx)) != len(idx):  # one Row in two slots would advance twice
            raise CacheError(f"rows {idx} name a row twice (a batch row is one sequence; snapshot(rows) and "
                             "restore copy one)")
        return idx

    def filter(self, rows: Sequence[int]) -> None:
        """Keep only `rows`, in that order. Other rows' KV is dropped, nothing is copied but the
        constant-size Gated DeltaNet state of the rows kept."""
        self.check_usable()
        idx = self._check_rows(rows)
        if idx == list(range(self.batch_size)):
            return
        t = torch.tensor(idx, dtype=torch.long, device=self.layout.device)
        self.rows = [self.rows[i] for i in idx]
        for s in self.deltanet:
            s.conv, s.recurrent, s.steps = s.conv.index_select(0, t), s.recurrent.index_select(0, t), None
        self.last_forward = 0

    @classmethod
    def merge(cls, caches: Sequence[HybridCache]) -> HybridCache:
        """One cache holding the rows of `caches` in order. Rows are moved, not copied (their KV stays
        where it is); the given caches must not be used afterwards (snapshots of them stay valid)."""
        caches = [c for c in caches if c is not None]
        if not caches:
            raise CacheError("merge needs at least one cache")
        if len({id(c) for c in caches}) != len(caches):
            raise CacheError("merge: the same cache given twice (its rows would be one sequence in two slots)")
        for c in caches:
            c.check_usable()
        layout = caches[0].layout
        if any(c.layout.layer_types != layout.layer_types for c in caches):
            raise CacheError("merge: caches of different layer layouts")
        first = caches[0]
        for c in caches[1:]:
            first._check_state_shapes([(s.conv, s.recurrent) for s in c.deltanet], "merge: a cache")
            if (c.layout.num_kv_heads, c.layout.head_dim) != (layout.num_kv_heads, layout.head_dim):
                raise CacheError(f"merge: caches of different attention shapes ({c.layout.num_kv_heads} x "
                                 f"{c.layout.head_dim} against {layout.num_kv_heads} x {layout.head_dim})")
        if any(c.layout.kv_cache != layout.kv_cache for c in caches):
            formats = sorted({c.layout.kv_cache for c in caches})
            raise CacheError(f"merge: caches of different KV formats {formats}")
        rows = [r for c in caches for r in c.rows]
        dn = [DeltaNetState(torch.cat([c.deltanet[d].conv for c in caches]),
                            torch.cat([c.deltanet[d].recurrent for c in caches]))
              for d in range(layout.num_deltanet)]
        return cls(layout, rows, dn)
