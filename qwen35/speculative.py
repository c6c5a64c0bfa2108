"""Speculative decoding with the checkpoint's own MTP head: draft k tokens, verify them in one forward.

Each round, for every row of a batch: the MTP head drafts k tokens (its first draft from the target model's
true hidden states, the next ones chained on its own output hidden), then the target model runs [last token,
draft 1..k] in one forward of k+1 tokens per row (the whole-layer kernels read every matrix once for all of
them and compute each token exactly as its own decode step would). Then, position by position:
- greedy: the target token is the argmax of the processed verify logits, exactly what plain decoding takes;
  a draft is kept while it equals it;
- sampling: the draft was drawn from the MTP head's distribution q, processed like the target's
  (penalties, temperature, top-k/top-p/min-p: `Sampler.distribution`); it is kept with probability
  min(1, p/q), else the token is drawn from the normalized residual max(0, p - q) (`speculative_accept`),
  so every token follows exactly the distribution plain sampling would draw from (not the same draws).
Rows accept different numbers of tokens. Rollback costs nothing: the verify forward keeps the Gated DeltaNet
state after each token (`HybridCache.keep_steps`) and `rewind` lands each row on its last kept token, the KV
cut by length; the MTP head's own KV is cut back to the entries built from true hidden states (`truncate`).
The cache is only ever left at an accepted position, so snapshots and prompt reuse see plain decoding's state.

`Speculation` (speculation.py, beside the draft head and each request's drafting state) is how callers ask
for it (generate_step, stream_generate, ChatSession, the server engine): k fixed or adaptive (draft_policy),
an optional reduced draft vocabulary, and the acceptance statistics.
It is an argument of its own, not a SamplingParams field: it changes how tokens are computed, never which
distribution they come from, and it belongs to the deployment (an MTP head, a draft vocabulary built once,
round costs measured across requests), not to a request.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch

from . import threads
from .cache import HybridCache
from .draft_policy import SEEDED_DRAFTS, SpeculativeStats, choose_k, loses, seeded_sampling
from .generation import Response, Stream
from .sampling import SamplingParams, greedy, speculative_accept
from .selection import argmax, draw
from .speculation import (  # noqa: F401 - Speculation, SpeculativeError re-exported: callers import them from here
    MAX_VERIFY_ROWS,
    DraftHead,
    DraftRow,
    Speculation,
    SpeculativeError,
)


def prefill(model, ids: Sequence[int], cache: HybridCache, mcache: HybridCache, chunk_size: int) -> tuple[
        torch.Tensor, torch.Tensor]:
    """generation.prefill for one row that also builds the MTP head's KV over the pairs it can see (hidden
    at p, token p+1), chunk by chunk. The MTP cache starts at the main cache's position (its rotary offset
    set to match): a prefix restored from a snapshot has no MTP entries, which only makes early drafts
    weaker. Returns (fp32 logits [1, vocab] of the last token, its hidden state [H])."""
    if chunk_size < 1:
        raise ValueError(f"prefill chunk size must be >= 1, got {chunk_size}")
    prefill_start(cache, mcache)
    t = torch.tensor([list(ids)], device=model.device)
    T = t.shape[1]
    with torch.no_grad():
        for s in range(0, T, chunk_size):
            e = min(T, s + chunk_size)
            h = threads.run("prefill", lambda s=s, e=e: prefill_chunk(model, t, s, e, cache, mcache), e - s)
        return model.logits(h[:, -1:])[:, -1], h[0, -1]


def prefill_start(cache: HybridCache, mcache: HybridCache) -> None:
    """Line the (empty) MTP cache's rotary positions up with the main cache's next position."""
    mrow, row = mcache.rows[0], cache.rows[0]
    mrow.rope_delta = row.length + row.rope_delta - mrow.length


def prefill_chunk(model, t: torch.Tensor, s: int, e: int, cache: HybridCache, mcache: HybridCache) -> torch.Tensor:
    """Feed t[:, s:e] of the ids t [1, T] still to prefill (the server's chunk-at-a-time prefill calls this
    between decode steps); the MTP head sees each hidden with the next token, which for a chunk's last
    position is the next chunk's first (the prompt's last hidden waits for the first generated token).
    Returns the chunk's hidden states [1, e - s, H]."""
    T = t.shape[1]
    h = model.hidden_states(t[:, s:e], cache)
    n = e - s if e < T else e - s - 1
    if n:
        model.mtp_forward(h[:, :n], t[:, s + 1 : s + 1 + n], mcache, logits=False)
    return h


def start(row: DraftRow, first: Response, last_hidden: torch.Tensor) -> None:
    """After a prefill: the first MTP pair (the prompt's last hidden, the first generated token)."""
    if row.on and first.finish_reason is None:
        row.pending_h, row.pending_ids = [last_hidden], [first.token]


def step(model, cache: HybridCache, mcache: HybridCache, streams: Sequence[Stream], rows: Sequence[DraftRow],
         spec: Speculation, isolate: bool = False) -> list[list[Response]]:
    """One speculative round for a batch (row b of `cache` and `mcache` belongs to streams[b], rows[b]):
    draft, verify, accept, roll back. Returns, per stream, the tokens it produced (1..k+1)."""
    if not any(r.on for r in rows):
        from .generation import step as plain_step

        with torch.no_grad():  # as a drafting round runs: with autograd on, decode leaves the kernels' path
            out = plain_step(model, cache, streams, isolate)
        for r, rs in zip(rows, out):
            r.stats.record(0, 0, len(rs))
        return out
    t0 = time.perf_counter()
    head = spec.head(model)
    B = len(streams)
    # a seeded sampled row drafts a fixed number of tokens a round: adaptive k follows wall-clock round times,
    # and another k spends the seed's random numbers differently, so the same seed gave another text each run
    seeded = [seeded_sampling(s.params) for s in streams]
    limits = [min((spec.draft_tokens or SEEDED_DRAFTS) if fixed else spec.max_k,
                  s.params.max_tokens - len(s.generated) - 1) if r.on else 0 for s, r, fixed in zip(streams, rows, seeded)]
    cap = spec.max_k
    if model.kernels:  # past the kernels' rows the verify would round differently from decode steps: the
        # whole-layer kernels' MAX_VERIFY_ROWS, or where a layer runs per op (a shape they do not take, LoRA) the
        # GEMVs' GEMV_MAX_ROWS (its matrices meet more rows with a GEMM)
        from .ops.fast import GEMV_MAX_ROWS

        cap = min(cap, (MAX_VERIFY_ROWS if model.decode_stack is not None else GEMV_MAX_ROWS) // B - 1)
    K = min(cap, max(limits)) if spec.draft_tokens else choose_k(spec.costs, [r.stats for r in rows], limits, cap)
    K = max([K] + [min(cap, lim) for lim, fixed in zip(limits, seeded) if fixed])  # (exploring k=0 waits)
    ks = [max(0, min(K, lim)) for lim in limits]
    K = max(ks, default=0)
    drafts: list[list[int]] = [[] for _ in range(B)]
    qs: list[list[torch.Tensor]] = [[] for _ in range(B)]
    dev = model.device

    def forward():
        with torch.no_grad():
            if K:
                _draft(model, mcache, streams, rows, ks, K, head, drafts, qs, spec.propose)
            tokens = torch.tensor([[s.last] + d + [s.last] * (K - len(d)) for s, d in zip(streams, drafts)],
                                  device=dev)
            cache.keep_steps(True)
            vh = model.hidden_states(tokens, cache)
            return tokens, vh, _verify_logits(model, vh)

    # under the thread governor as plain decode steps are (threads.py): on a busy machine two threads stall at
    # every barrier, and rounds run on them were measured 20x slower than plain decoding on one, which also
    # kept adaptive k from ever seeing drafting lose (both sides of its comparison ran slow)
    tokens, vh, vlogits = threads.run("speculative", forward)
    out, keep = [], []
    for b, (s, r) in enumerate(zip(streams, rows)):
        try:
            rs = _accept(s, vlogits[b], drafts[b], qs[b])
        except Exception as e:
            if not isolate:
                raise
            s.finish = "error"
            rs = [Response(None, error=f"{type(e).__name__}: {e}")]
        out.append(rs)
        n = max(1, sum(x.token is not None for x in rs))
        keep.append(n)
        accepted = sum(1 for i, x in enumerate(rs[: len(drafts[b])]) if x.token == drafts[b][i])  # a prefix:
        # a round ends at its first replaced draft, and a replacement never equals its draft
        if ks[b]:
            r.stats.record(ks[b], accepted, n)
            spec.stats.record(ks[b], accepted, n)
        else:
            r.stats.record(0, 0, n)
        if r.on and s.finish is None:  # appended: a row that did not draft this round still holds its pairs
            r.pending_h += list(vh[b, :n])
            r.pending_ids += tokens[b, 1:n].tolist() + [s.last]
    cache.rewind(keep)
    cache.keep_steps(False)
    spec.costs.add(B, K, time.perf_counter() - t0)
    if not spec.draft_tokens:
        for s, r, fixed in zip(streams, rows, seeded):
            # (not a seeded row: turning off by measured times would make its text depend on them too)
            why = loses(spec.costs, r.stats, B, cap) if r.on and not fixed else None
            if why:
                r.turn_off(why, spec.stats, "loss")
    return out


def _verify_logits(model, vh: torch.Tensor) -> torch.Tensor:
    """fp32 logits [B, T, vocab] of the verify hidden states, projected GEMV_MAX_ROWS rows at a time: past
    that the head switches to torch's GEMM, which rounds differently from a decode step's GEMV (the GEMV
    reads the head once per 4 rows either way, so the chunks cost what one call would)."""
    from .ops.fast import GEMV_MAX_ROWS

    B, T, H = vh.shape
    flat = vh.reshape(B * T, H)
    if B * T <= GEMV_MAX_ROWS:
        return model.logits(flat).view(B, T, -1)
    return torch.cat([model.logits(flat[i : i + GEMV_MAX_ROWS]) for i in range(0, B * T, GEMV_MAX_ROWS)]).view(B, T, -1)


def _draft(model, mcache, streams, rows, ks, K, head, drafts, qs, propose) -> None:
    """Feed each drafting row's pending MTP pairs (padded to one length; the padding is cut off again), then
    draft up to K tokens per row, chained on the head's own hidden; the head's KV keeps only true pairs."""
    B, dev = len(streams), model.device
    base = mcache.lengths
    n = [len(r.pending_ids) if k else 0 for r, k in zip(rows, ks)]
    N = max(n)
    H = model.config.hidden_size
    hs = torch.zeros(B, N, H, dtype=model.dtype, device=dev)
    ids = torch.zeros(B, N, dtype=torch.long, device=dev)
    for b, r in enumerate(rows):
        if n[b]:
            hs[b, : n[b]] = torch.stack(r.pending_h)
            ids[b, : n[b]] = torch.tensor(r.pending_ids)
    _, h = model.mtp_forward(hs, ids, mcache, logits=False)
    exact = [L + m for L, m in zip(base, n)]
    for b, r in enumerate(rows):
        if n[b]:
            r.pending_h, r.pending_ids = [], []
    h = torch.stack([h[b, max(m, 1) - 1] for b, m in enumerate(n)])[:, None]  # [B, 1, H]
    for j in range(K):
        logits = head.logits(h)[:, -1]
        nxt = []
        for b, s in enumerate(streams):
            if j < ks[b]:
                tok, q = _draw(s, head, logits[b : b + 1], drafts[b])
                if propose is not None:
                    tok = propose(s.generated + drafts[b], tok)
                drafts[b].append(tok)
                if q is not None:
                    qs[b].append(q)
            nxt.append(drafts[b][-1] if drafts[b] else s.last)
        if j + 1 < K:
            _, h = model.mtp_forward(h, torch.tensor([[t] for t in nxt], device=dev), mcache, logits=False)
    mcache.truncate(exact)


def _draw(stream: Stream, head: DraftHead, logits: torch.Tensor, pending: list[int]) -> tuple[int, torch.Tensor | None]:
    """One row's draft from draft logits [1, N]: greedy, the argmax after the same biases and penalties the
    target gets (the earlier drafts counted as generated); sampling, a draw from q = the processed draft
    distribution, returned for the acceptance rule."""
    sampler, p = stream.sampler, stream.params
    if p.greedy:
        if sampler.plain:
            return head.token(int(argmax(logits.float()))), None
        return int(argmax(sampler.process(head.full(logits), pending))), None
    q = sampler.distribution(head.full(logits), pending)[0]
    return draw(q, sampler.generator), q


def _accept(stream: Stream, vlogits: torch.Tensor, drafts: list[int], qs: list[torch.Tensor]) -> list[Response]:
    """Tokens of one row from its verify logits [T, vocab]: each drafted position keeps its draft or
    replaces it (and ends the round); after k accepted drafts the bonus token is sampled as plain decoding
    would."""
    out = []
    for i in range(len(drafts) + 1):
        logits = vlogits[i : i + 1]
        if i == len(drafts):
            out.append(stream.sample(logits))
            break
        if stream.params.greedy:
            tok = int(greedy(stream.sampler.process(logits)))
        else:
            _, tok = speculative_accept(stream.sampler.distribution(logits)[0], qs[i], drafts[i],
                                        stream.sampler.generator)
        out.append(stream.emit(tok, logits))
        if stream.finish is not None or tok != drafts[i]:
            break
    return out


def generate(model, ids: list[int], cache: HybridCache, params: SamplingParams, spec: Speculation,
             prefill_chunk_size: int, sampler=None) -> Iterator[Response]:
    """generation.generate_step's body with drafting (one row)."""
    spec.head(model)  # a checkpoint without an MTP head fails here, before any work
    stream = Stream(params, sampler) if sampler is not None else Stream.start(model, ids, params)
    row = spec.new_row(params)
    mcache = model.make_mtp_cache(batch_size=1)
    logits, last_h = prefill(model, ids, cache, mcache, prefill_chunk_size)
    with torch.no_grad():
        r = stream.sample(logits)
    start(row, r, last_h)
    yield r
    while stream.finish is None:
        before, pending = cache.snapshot(), r.token  # (the round feeds `pending`, the last token yielded, first)
        rs = step(model, cache, mcache, [stream], [row], spec)[0]
        for j, r in enumerate(rs, 1):
            try:
                yield r
            except GeneratorExit:
                if j < len(rs):  # closed mid-round: the cache holds tokens the caller never took
                    _back_to(model, cache, before, [pending] + [x.token for x in rs[: j - 1]])
                raise


def _back_to(model, cache: HybridCache, before, fed: list[int]) -> None:
    """Leave `cache` as generate_step promises when its caller stops: the prompt and every token yielded but
    the last. A round yields all its accepted tokens at once, so the cache is put back to the round's start and
    the tokens the caller took (before its last) are fed again: a forward of at most draft_tokens tokens, and
    only when a caller stops part-way through a round."""
    cache.restore(before)
    with torch.no_grad():
        model.hidden_states(torch.tensor([fed], device=model.device), cache=cache)


def speculative_generate_step(model, prompt_ids, params: SamplingParams | None = None, draft_tokens: int = 2,
                              stats: SpeculativeStats | None = None, **kw) -> Iterator[Response]:
    """`generation.generate_step` with MTP drafting of `draft_tokens` per round (kept for the first step's
    callers; `generate_step(..., speculative=Speculation(...))` is the general form)."""
    from .generation import generate_step

    spec = Speculation(draft_tokens=draft_tokens)
    if stats is not None:
        spec.stats = stats
    return generate_step(model, prompt_ids, params=params, speculative=spec, **kw)
