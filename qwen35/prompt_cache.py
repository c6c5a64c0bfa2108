"""Prompt reuse: cache snapshots at exact token positions, restore the longest matching prefix.

Recurrent state cannot be trimmed back to an arbitrary position, so reuse on a hybrid model works only
through snapshots taken exactly where a later prompt may diverge: the end of each served prompt and each
turn boundary. A lookup restores the longest stored token prefix of the new prompt; only the rest is
prefilled. Entries live in an LRU bounded in bytes (a snapshot's KV prefix + Gated DeltaNet state).
"""

from __future__ import annotations

from collections import OrderedDict

from .cache import CacheSnapshot, HybridCache


class PromptCache:
    def __init__(self, model, max_bytes: int = 2 * 2**30):
        self.model = model
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[int, ...], CacheSnapshot] = OrderedDict()
        self.hits = self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.entries.values())

    def lookup(self, tokens: list[int]) -> tuple[HybridCache, int]:
        """A fresh cache (batch 1) holding the longest stored prefix of `tokens`, and its length.
        At least one token is always left to prefill, so the caller gets logits for the last one."""
        best: tuple[int, ...] | None = None
        for key in self.entries:
            if len(key) < len(tokens) and (best is None or len(key) > len(best)) and tuple(tokens[: len(key)]) == key:
                best = key
        cache = self.model.make_cache(batch_size=1)
        if best is None:
            self.misses += 1
            return cache, 0
        self.hits += 1
        self.entries.move_to_end(best)
        cache.restore(self.entries[best])
        return cache, len(best)

    def store(self, tokens: list[int], cache: HybridCache) -> None:
        """Remember `cache` (batch 1), which must hold exactly `tokens`."""
        if self.max_bytes <= 0:
            return  # reuse disabled
        if cache.batch_size != 1 or cache.offset != len(tokens):
            raise ValueError(f"cache holds {cache.lengths} tokens (batch {cache.batch_size}), not the {len(tokens)} given")
        self.store_snapshot(tokens, cache.snapshot())

    def store_snapshot(self, tokens: list[int], snap: CacheSnapshot) -> None:
        """Remember a one-row snapshot holding exactly `tokens` (e.g. one row of a batch)."""
        if self.max_bytes <= 0:
            return
        if len(snap.rows) != 1 or snap.offset != len(tokens):
            raise ValueError(f"snapshot holds {[r.length for r in snap.rows]} tokens, not the {len(tokens)} given")
        key = tuple(tokens)
        self.entries[key] = snap
        self.entries.move_to_end(key)
        while len(self.entries) > 1 and self.nbytes > self.max_bytes:
            self.entries.popitem(last=False)

    def clear(self) -> None:
        self.entries.clear()
