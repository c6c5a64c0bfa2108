"""Prompt reuse: cache snapshots at exact token positions, restore the longest matching prefix.

Recurrent state cannot be trimmed back to an arbitrary position, so reuse on a hybrid model works only
through snapshots taken exactly where a later prompt may diverge: the end of each served prompt and each
turn boundary. A lookup restores the longest stored token prefix of the new prompt; only the rest is
prefilled. A prompt's end is stored with its last token's logits, so the same prompt again (a retry, or
the workaround for n > 1) restores it whole and prefills nothing.

Entries live in an LRU bounded in bytes by what they really keep alive (`nbytes`). A snapshot keeps whole KV
buffers alive, not just its prefix, and the snapshots of one conversation share them: each buffer is counted
once, at the size it has once no row writes into it (the longest prefix an entry holds: cache.trim_buffer
frees the rest, on every store and when the server ends a request), plus each entry's Gated DeltaNet state
and logits. When a request's answer is stored, what it restored from, its turn boundary and its prompt's
end hold less of the same conversation: the caller names them (`store_snapshot(demote=...)`) and they are
evicted before any other entry (the earliest demoted first) unless a lookup uses them again. They cost
little to keep (their KV is the answer's), but under pressure every conversation's latest answer matters
more: four users taking turns with room for eight answers reused 0% of turns 2-5 under plain LRU, 83%
(all there is to reuse) with this. A client whose next prompt does not repeat the answer's tokens (its
reasoning dropped, or a tool call re-rendered from its parsed form) needs what comes before the answer instead:
the cache remembers what each answer continued (`answers`: the request's turn boundary, else its prompt's end),
and a prompt that continues that point but not the answer stored after it (`drops_answers`) marks a client
whose answers are worth less than their turn boundaries: the caller stores that request's answer demoted and
keeps its boundary (thinking on, answers sent back without reasoning, four users with room for 8 / 12 / 16
answers: 0% / 1% / 4% of turns 2-5 reused before, 53% / 60% / 63% of 66% possible now:
benchmarks/bench_prompt_reuse.py).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence

import torch

from .cache import CacheSnapshot, HybridCache, trim_buffer
from .kv_storage import KVBuffer


class _Held:
    """The bytes a set of entries keeps alive, kept up to date as entries leave (an eviction recounts nothing):
    KV buffers by identity, Gated DeltaNet tensors by storage, each counted once however many entries share it."""

    def __init__(self, entries: Iterable[CacheSnapshot], logits: Iterable[torch.Tensor]):
        self.kv: dict[int, tuple[KVBuffer, Counter]] = {}  # id -> (buffer, the lengths entries hold of it)
        self.state: dict[int, list[int]] = {}  # storage address -> [entries using it, bytes]
        self.total = sum(t.nbytes for t in logits)
        for snap in entries:
            self.add(snap)

    @staticmethod
    def _kv_bytes(buf: KVBuffer, lengths: Counter) -> int:
        # the size trim_buffer leaves it once no row writes into it (a live row's reserve is its request's)
        return min(buf.capacity, max(lengths)) * buf.token_bytes if lengths else 0

    def _tensors(self, snap: CacheSnapshot):
        for conv, rec in snap.deltanet:
            for t in (conv, rec):
                yield t.untyped_storage()

    def add(self, snap: CacheSnapshot) -> None:
        for r in snap.rows:
            for b in r.kv:
                if b is not None:
                    _, lengths = self.kv.setdefault(id(b), (b, Counter()))
                    self.total -= self._kv_bytes(b, lengths)
                    lengths[r.length] += 1
                    self.total += self._kv_bytes(b, lengths)
        for st in self._tensors(snap):
            ref = self.state.setdefault(st.data_ptr(), [0, st.nbytes()])
            ref[0] += 1
            self.total += ref[1] if ref[0] == 1 else 0

    def remove(self, snap: CacheSnapshot, logits: torch.Tensor | None) -> None:
        self.total -= 0 if logits is None else logits.nbytes
        for r in snap.rows:
            for b in r.kv:
                if b is not None:
                    _, lengths = self.kv[id(b)]
                    self.total -= self._kv_bytes(b, lengths)
                    lengths[r.length] -= 1
                    if not lengths[r.length]:
                        del lengths[r.length]
                    self.total += self._kv_bytes(b, lengths)
        for st in self._tensors(snap):
            ref = self.state[st.data_ptr()]
            ref[0] -= 1
            self.total -= ref[1] if ref[0] == 0 else 0


class PromptCache:
    def __init__(self, model, max_bytes: int = 2 * 2**30):
        self.model = model
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[int, ...], CacheSnapshot] = OrderedDict()
        self.logits: dict[tuple[int, ...], torch.Tensor] = {}  # the last token's, for entries that have them
        self.demoted: set[tuple[int, ...]] = set()  # evicted first; `entries` orders them by demotion
        # what a stored answer continued (its turn boundary or prompt end) -> the answer's tokens after it,
        # while either is stored
        self.answers: dict[tuple[int, ...], tuple[int, ...]] = {}
        self.answered: dict[tuple[int, ...], int] = {}  # a stored answer -> the length of its prompt
        self.hits = self.misses = 0

    @property
    def nbytes(self) -> int:
        """Memory the entries keep alive (the module docstring says how it is counted)."""
        return _Held(self.entries.values(), self.logits.values()).total

    def lookup_exact(self, tokens: list[int]) -> tuple[HybridCache, torch.Tensor] | None:
        """A fresh cache (batch 1) holding all of `tokens` and a copy of their last token's logits [1, vocab],
        where that prompt was stored with them; else None."""
        key = tuple(tokens)
        if key not in self.logits:
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        self.demoted.discard(key)
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
        self.demoted.discard(best)
        cache.restore(self.entries[best])
        return cache, len(best)

    def drops_answers(self, tokens: Sequence[int]) -> bool:
        """Whether `tokens` continue what a stored answer continued but not that answer (the client sent it
        back otherwise than generated: without its reasoning, or re-rendered), so the next turn of this
        conversation will restore from before the answer, not from it."""
        t = tuple(tokens)
        # (a prompt that stops inside the answer, the same prompt sent again, is no sign)
        return any(len(p) < len(t) and t[:len(p)] == p and t[len(p):len(p) + len(a)] != a[:len(t) - len(p)]
                   for p, a in self.answers.items())

    def store(self, tokens: list[int], cache: HybridCache, logits: torch.Tensor | None = None) -> None:
        """Remember `cache` (batch 1), which must hold exactly `tokens`, and the logits [1, vocab] its last
        token gave (for lookup_exact), if given."""
        if self.max_bytes <= 0:
            return  # reuse disabled
        if cache.batch_size != 1 or cache.offset != len(tokens):
            raise ValueError(f"cache holds {cache.lengths} tokens (batch {cache.batch_size}), not the {len(tokens)} given")
        self.store_snapshot(tokens, cache.snapshot(), logits)

    def store_snapshot(self, tokens: list[int], snap: CacheSnapshot, logits: torch.Tensor | None = None,
                       demote: Iterable[Sequence[int]] = (), answer_of: int = 0, demoted: bool = False) -> None:
        """Remember a one-row snapshot holding exactly `tokens` (e.g. one row of a batch). demote: keys of
        entries this one makes worth less (a request's own earlier snapshots, prefixes of its answer's): they
        are evicted first, in that order. answer_of: where the answer that `tokens` hold starts (what it
        continued; 0: not an answer), for `drops_answers`. demoted: store this entry as evicted first too."""
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
        self.demoted.discard(key)
        if 0 < answer_of < len(key):
            self.answers[key[:answer_of]] = key[answer_of:]
            self.answered[key] = answer_of
        for k in [*map(tuple, demote), *((key,) if demoted else ())]:
            if (k != key or demoted) and k in self.entries:
                self.entries.move_to_end(k)
                self.demoted.add(k)
        self._evict()

    def _evict(self) -> None:
        """Drop entries, the demoted ones first, then the least recently used, until what they keep alive fits
        max_bytes (the one just stored stays, unless it was stored demoted)."""
        for buf in self._buffers(self.entries.values()):  # a request that ended without trimming (cancelled)
            trim_buffer(buf)
        held = _Held(self.entries.values(), self.logits.values())
        gone = []
        while len(self.entries) > 1 and held.total > self.max_bytes:
            old = next((k for k in self.entries if k in self.demoted), None)
            old = next(iter(self.entries)) if old is None else old
            snap = self.entries.pop(old)
            self.demoted.discard(old)
            held.remove(snap, self.logits.pop(old, None))
            gone.append(snap)
            self._forget_answer(old)
        if gone:
            bufs = list(self._buffers(gone))
            gone = snap = None  # (their holds end here)
            for buf in bufs:  # what is left of a shared buffer may be a shorter prefix
                trim_buffer(buf)

    def _forget_answer(self, key: tuple[int, ...]) -> None:
        """`key` left the cache: drop what `answers` knows of the answer it was the prompt of, or was,
        unless the other of the two is still stored."""
        rest = self.answers.get(key)
        if rest is not None and key + rest not in self.entries:
            del self.answers[key]
        n = self.answered.pop(key, 0)
        if n and key[:n] not in self.entries:
            self.answers.pop(key[:n], None)

    @staticmethod
    def _buffers(snaps: Iterable[CacheSnapshot]) -> Iterable[KVBuffer]:
        """Each KV buffer of `snaps` once."""
        return {id(b): b for s in snaps for r in s.rows for b in r.kv if b is not None}.values()

    def clear(self) -> None:
        self.entries.clear()
        self.logits.clear()
        self.demoted.clear()
        self.answers.clear()
        self.answered.clear()
