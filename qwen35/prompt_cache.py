"""Prompt reuse: cache snapshots at exact token positions, restore the longest matching prefix.

Recurrent state cannot be trimmed back to an arbitrary position, so reuse on a hybrid model works only
through snapshots taken exactly where a later prompt may diverge: the end of each served prompt and each
turn boundary. A lookup restores the longest stored token prefix of the new prompt; only the rest is
prefilled. A prompt's end is stored with its last token's logits, so the same prompt again (a retry, or
the workaround for n > 1) restores it whole and prefills nothing. Entries live in an LRU bounded in bytes (a
snapshot's KV prefix + Gated DeltaNet state, + its logits).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from .cache import CacheSnapshot, HybridCache


class PromptCache:
    def __init__(self, model, max_bytes: int = 2 * 2**30):
        self.model = model
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[int, ...], CacheSnapshot] = OrderedDict()
        self.logits: dict[tuple[int, ...], torch.Tensor] = {}  # the last token's, for entries that have them
        self.hits = self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.entries.values()) + sum(t.nbytes for t in self.logits.values())

    def lookup_exact(self, tokens: list[int]) -> tuple[HybridCache, torch.Tensor] | None:
        """A fresh cache (batch 1) holding all of `tokens` and a copy of their last token's logits [1, vocab],
        where that prompt was stored with them; else None."""
        key = tuple(tokens)
        if key not in self.logits:
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        cache = self.model.make_cache(batch_size=1)
        cache.restore(self.entries[key])
        return cache, self.logits[key].clone()

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

    def store(self, tokens: list[int], cache: HybridCache, logits: torch.Tensor | None = None) -> None:
        """Remember `cache` (batch 1), which must hold exactly `tokens`, and the logits [1, vocab] its last
        token gave (for lookup_exact), if given."""
        if self.max_bytes <= 0:
            return  # reuse disabled
        if cache.batch_size != 1 or cache.offset != len(tokens):
            raise ValueError(f"cache holds {cache.lengths} tokens (batch {cache.batch_size}), not the {len(tokens)} given")
        self.store_snapshot(tokens, cache.snapshot(), logits)

    def store_snapshot(self, tokens: list[int], snap: CacheSnapshot, logits: torch.Tensor | None = None) -> None:
        """Remember a one-row snapshot holding exactly `tokens` (e.g. one row of a batch)."""
        if self.max_bytes <= 0:
            return
        if len(snap.rows) != 1 or snap.offset != len(tokens):
            raise ValueError(f"snapshot holds {[r.length for r in snap.rows]} tokens, not the {len(tokens)} given")
        key = tuple(tokens)
        self.entries[key] = snap
        if logits is not None:
            self.logits[key] = logits.detach().clone()
        else:
            self.logits.pop(key, None)
        self.entries.move_to_end(key)
        while len(self.entries) > 1 and self.nbytes > self.max_bytes:
            old, _ = self.entries.popitem(last=False)
            self.logits.pop(old, None)

    def clear(self) -> None:
        self.entries.clear()
        self.logits.clear()
