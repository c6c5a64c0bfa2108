"""Sampling: the Sampler that turns logits into tokens, as SamplingParams (sampling_params.py) ask.

Order of processing (each step, per sequence): logit_bias -> repetition penalty (prompt + generated
tokens, CTRL-style: divide positive logits, multiply negative ones) -> presence and frequency penalties
(generated tokens only, OpenAI-style) -> temperature -> top_k -> top_p -> min_p -> draw.
temperature 0 is greedy (argmax after biases and penalties). Randomness comes only from a
torch.Generator seeded from `seed`, so a seed reproduces a run exactly.
Logprobs are those of the model's own distribution (log_softmax of the raw logits), as OpenAI reports.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

from .errors import SamplingError
from .sampling_params import NON_THINKING_PRESET, THINKING_PRESET, SamplingParams, preset  # noqa: F401 - re-exported
from .selection import argmax, draw, top_k

log = logging.getLogger("qwen35")


class Sampler:
    """Stateful per batch: remembers generated-token counts (penalties) and the generator (seed).

    `prompt_tokens` (list of id lists, one per sequence) feed only the repetition penalty.

    Every step touches the whole vocabulary (248,320 logits) as few times as it can: the penalties and biases
    are applied at the ids they concern only, and top-k / top-p / min-p find the few tokens that can still be
    drawn before anything is sorted or normalized. The straightforward way (a full sort for top-p, the
    penalties as whole-vocabulary tensors, torch.multinomial over every logit) cost 18 ms a token with the
    model card's presets, as long as a whole 0.8B int4 decode step; `reference_distribution` keeps it, and
    the tests hold the two to the same probabilities.
    """

    def __init__(self, params: SamplingParams, vocab_size: int, batch_size: int = 1,
                 prompt_tokens: list[list[int]] | None = None, generator: torch.Generator | None = None):
        self.params = params
        self.vocab_size = vocab_size
        for tok in params.logit_bias:
            if not 0 <= tok < vocab_size:
                raise SamplingError(f"logit_bias token id {tok} is outside the vocabulary [0, {vocab_size})")
        _warn_unreachable_stops(params.stop_token_ids, vocab_size)
        self.generator = generator
        if self.generator is None and params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)
        self.counts = torch.zeros(batch_size, vocab_size, dtype=torch.float32)
        self.seen = torch.zeros(batch_size, vocab_size, dtype=torch.bool)  # prompt + generated
        # per row, the ids whose counts or seen flag are set: the only logits a penalty changes
        self._touched: list[set[int]] = [set() for _ in range(batch_size)]
        self._touched_ids: list[torch.Tensor | None] = [None] * batch_size  # the set as a tensor, while current
        if prompt_tokens is not None and params.repetition_penalty != 1.0:
            for b, toks in enumerate(prompt_tokens):
                self.seen[b, torch.as_tensor(toks, dtype=torch.long)] = True
                self._touched[b].update(int(t) for t in toks)
        self.bias = None
        if params.logit_bias:
            self.bias = torch.zeros(vocab_size)
            for tok, v in params.logit_bias.items():
                self.bias[tok] = v
            self._bias_ids = torch.tensor(sorted(params.logit_bias), dtype=torch.long)
            self._bias_vals = self.bias[self._bias_ids]
        # no bias, no penalty: processing would only copy the logits, and the counts are never read
        self.plain = (self.bias is None and params.repetition_penalty == 1.0 and not params.presence_penalty
                      and not params.frequency_penalty)

    def _ids(self, b: int) -> torch.Tensor:
        if self._touched_ids[b] is None:
            self._touched_ids[b] = torch.tensor(sorted(self._touched[b]), dtype=torch.long)
        return self._touched_ids[b]

    def process(self, logits: torch.Tensor, pending: Sequence[int] = ()) -> torch.Tensor:
        """Biases and penalties applied to fp32 logits [B, V] (a new tensor). pending: tokens counted as if
        observed (a speculative draft's earlier tokens), for one row (B = 1). Each penalty is applied at the
        ids it concerns; elsewhere it would subtract 0 or keep the logit, so the result is the same as the
        whole-vocabulary formulas' (tested)."""
        p = self.params
        x = logits.float().clone()
        if self.bias is not None:
            x[:, self._bias_ids] += self._bias_vals
        if not (p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty):
            return x
        for b in range(x.shape[0]):
            ids = self._ids(b)
            at, extra = [], []  # where each pending token sits in ids
            for t in pending:
                if t in self._touched[b]:
                    at.append(int(torch.searchsorted(ids, t)))
                else:
                    if t not in extra:
                        extra.append(t)
                    at.append(ids.numel() + extra.index(t))
            if extra:
                ids = torch.cat([ids, torch.tensor(extra, dtype=torch.long)])
            if ids.numel() == 0:
                continue
            counts, seen = self.counts[b, ids], self.seen[b, ids]
            for i in at:
                counts[i] += 1
                seen[i] = True
            x[b, ids] = self._penalised(x[b, ids], counts, seen)
        return x

    def _penalised(self, x: torch.Tensor, counts: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """The three penalties on logits x given each one's count and seen flag (tensors of x's shape): the
        formulas both `process` (at the touched ids) and `reference_process` (everywhere) apply."""
        p = self.params
        if p.repetition_penalty != 1.0:
            pen = torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty)
            x = torch.where(seen, pen, x)
        if p.presence_penalty:
            x -= p.presence_penalty * (counts > 0)
        if p.frequency_penalty:
            x -= p.frequency_penalty * counts
        return x

    def _scaled(self, logits: torch.Tensor, pending: Sequence[int] = ()) -> torch.Tensor:
        """Processed logits less each row's maximum, divided by the temperature, [B, V] fp32 (a new tensor).
        The maximum first (softmax is the same): a tiny temperature then sends the others to -inf, greedy as its
        limit is, where dividing first overflowed to inf (and inf - inf to NaN). A temperature that fp32 holds
        as 0 (1e-300) is fp32's smallest normal number instead, for the same limit rather than 0 / 0."""
        x = logits.float() if self.plain else self.process(logits, pending)
        top = x.amax(-1, keepdim=True).nan_to_num(0.0, 0.0, 0.0)  # (a row all -inf, or NaN, as it is)
        return (x - top).div_(max(self.params.temperature, torch.finfo(torch.float32).tiny))

    def _kept(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The tokens top_k, top_p and min_p leave drawable from one row of scaled logits y [V]: (their scaled
        logits, their ids), highest first (ties by id), or (y, None) where every token stays. What
        `reference_distribution` keeps, found from a top-k instead of a sort of the whole vocabulary."""
        p, V = self.params, y.numel()
        if bool(torch.isnan(y.max())):  # (max propagates NaN) before top_p's softmax meets an empty set
            raise SamplingError("cannot draw a token: the logits hold NaN")
        vals = ids = None
        if p.top_k and p.top_k < V:
            k = p.top_k
            top, at = top_k(y, k + 1)
            if top[k] < top[k - 1]:  # no tie at the k-th value: exactly these k
                vals, ids = top[:k], at[:k]
            elif top[k - 1] == float("-inf"):  # fewer than k finite logits: those
                n = int((top > float("-inf")).sum())
                vals, ids = top[:n], at[:n]
            else:  # every token tied with the k-th stays, as in the reference
                ids = (y >= top[k - 1]).nonzero()[:, 0]
                vals, order = y[ids].sort(descending=True, stable=True)
                ids = ids[order]
        if p.top_p < 1.0:
            if vals is None:  # the top-p set from the largest logits: grow until it provably holds the set
                m = y.max()
                total = (y - m).exp().sum()  # the softmax's denominator over the whole vocabulary
                n = min(64, V)
                while True:
                    top, at = top_k(y, n)
                    probs = (top - m).exp() / total
                    # done when the tokens before the last value's run (ties with tokens left out) reach top_p
                    if n == V or float(probs[: int((top == top[-1]).nonzero()[0, 0])].sum()) >= p.top_p:
                        break
                    n = min(V, n * 8)
                vals, ids = top, at
            else:
                probs = _softmax(vals)
            # the first always stays, even for a top_p that is 0 in fp32 (1e-300)
            keep = max(1, int(((probs.cumsum(0) - probs) < p.top_p).sum()))
            vals, ids = vals[:keep], ids[:keep]
        if p.min_p > 0:
            if vals is None:  # a superset first: within 1e-3 of the rule's log-ratio, then the rule itself
                ids = (y >= y.max() + math.log(p.min_p) - 1e-3).nonzero()[:, 0]
                vals, order = y[ids].sort(descending=True, stable=True)
                ids = ids[order]
            probs = _softmax(vals)
            keep = probs >= p.min_p * probs.max()
            vals, ids = vals[keep], ids[keep]
        if vals is None:
            return y, None
        if vals.numel() == 0 or not bool(vals[0] > float("-inf")):
            if bool(y.isnan().any()):
                raise SamplingError("cannot draw a token: the logits hold NaN")
            raise SamplingError("no token can be drawn: every logit is -inf after the biases, penalties and mask")
        return vals, ids

    def distribution(self, logits: torch.Tensor, pending: Sequence[int] = ()) -> torch.Tensor:
        """The probabilities [B, V] a (non-greedy) draw takes its token from: processed logits, temperature,
        top_k, top_p, min_p, softmax. Speculative sampling applies the same to the draft and the target."""
        y = self._scaled(logits, pending)
        out = torch.zeros_like(y)
        for b in range(y.shape[0]):
            vals, ids = self._kept(y[b])
            if ids is None:
                out[b] = _softmax(vals)
            else:
                out[b, ids] = _softmax(vals)
        return out

    def reference_distribution(self, logits: torch.Tensor, pending: Sequence[int] = ()) -> torch.Tensor:
        """`distribution` the plain way, over the whole vocabulary at every step, in float64 after the scaling
        (tests hold the fast one to it; torch's fp32 softmax is off by up to ~1e-5 relative here, which
        would move the top-p boundary by more than the fast path's own rounding)."""
        p = self.params
        x = (self.reference_process(logits, pending) / p.temperature).double()
        if p.top_k and p.top_k < x.shape[-1]:
            kth = x.topk(p.top_k, dim=-1).values[..., -1:]
            x = x.masked_fill(x < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_x, idx = x.sort(dim=-1, descending=True, stable=True)
            probs = sorted_x.softmax(-1)
            # drop a token when the tokens before it already reach top_p (the first always stays)
            drop = (probs.cumsum(-1) - probs) >= p.top_p
            x = x.scatter(-1, idx, sorted_x.masked_fill(drop, float("-inf")))
        if p.min_p > 0:
            probs = x.softmax(-1)
            x = x.masked_fill(probs < p.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
        return x.softmax(-1)

    def reference_process(self, logits: torch.Tensor, pending: Sequence[int] = ()) -> torch.Tensor:
        """`process` with whole-vocabulary tensors (tests hold `process` to it)."""
        x = logits.float().clone()
        if self.bias is not None:
            x += self.bias
        counts, seen = self.counts, self.seen
        if pending:
            counts, seen = counts.clone(), seen.clone()
            for t in pending:
                counts[0, t] += 1
                seen[0, t] = True
        return self._penalised(x, counts, seen)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] -> tokens [B] (long). Call `observe(tokens)` after accepting them."""
        if self.params.greedy:
            return greedy(logits.float() if self.plain else self.process(logits))
        y = self._scaled(logits)
        out = torch.empty(y.shape[0], dtype=torch.long)
        for b in range(y.shape[0]):
            vals, ids = self._kept(y[b])
            m = vals.max()
            if not bool(m > float("-inf")):  # also a NaN maximum
                if bool(vals.isnan().any()):
                    raise SamplingError("cannot draw a token: the logits hold NaN")
                raise SamplingError("no token can be drawn: every logit is -inf after the biases, penalties and mask")
            i = draw((vals - m).exp(), self.generator)  # draw needs no normalized weights
            out[b] = i if ids is None else int(ids[i])
        return out

    def observe(self, tokens: torch.Tensor) -> None:
        """Count accepted tokens [B] for the penalties (nothing to count without them)."""
        if self.plain:
            return
        rows = torch.arange(tokens.shape[0])
        self.counts[rows, tokens] += 1
        self.seen[rows, tokens] = True
        for b, t in enumerate(tokens.tolist()):
            if t not in self._touched[b]:
                self._touched[b].add(t)
                self._touched_ids[b] = None


_WARNED: set[tuple[tuple[int, ...], int]] = set()


def _warn_unreachable_stops(stop_ids: tuple[int, ...], vocab_size: int) -> None:
    """Say (once per ids and vocabulary) that stop ids outside the vocabulary can never be sampled, so they
    never stop anything: Qwen3.5's end ids (248046, 248044) given to a model of another vocabulary run to
    max_tokens. A warning, not an error: a format replica keeps the real tokenizer beside a small vocabulary."""
    out = tuple(t for t in stop_ids if not 0 <= t < vocab_size)
    if out and (out, vocab_size) not in _WARNED:
        _WARNED.add((out, vocab_size))
        log.warning("stop token id%s %s outside the vocabulary of %d ids: never sampled, they stop nothing",
                    "s" if len(out) > 1 else "", ", ".join(map(str, out)) + (" are" if len(out) > 1 else " is"),
                    vocab_size)


def greedy(x: torch.Tensor) -> torch.Tensor:
    """The argmax tokens [B] of processed logits x [B, V]; a row holding NaN, or one whose every logit is -inf
    (biases, penalties and a mask leave nothing), is an error, as it is for sampling: argmax would pick the NaN
    (as torch's does) or token 0, and the answer would go on as if nothing were wrong. Reads B values."""
    ids = argmax(x)
    # one small op and B values in Python: on the decode path every torch op costs tens of microseconds cold
    for top in x.gather(1, ids[:, None]).flatten().tolist():
        if math.isnan(top):
            raise SamplingError("cannot draw a token: the logits hold NaN")
        if top == float("-inf"):
            raise SamplingError("no token can be drawn: every logit is -inf after the biases, penalties and mask")
    return ids


def _softmax(v: torch.Tensor) -> torch.Tensor:
    """softmax of a 1-D tensor with torch's exact exp (its fused softmax kernel's exp is off by up to ~1e-5
    relative on CPU, enough to move a top-p boundary)."""
    e = (v - v.max()).exp()
    return e / e.sum()


def step_logprobs(logits: torch.Tensor, token: torch.Tensor, params: SamplingParams):
    """(logprob of `token` [1], top logprobs as ((id, logprob), ...)) as params ask, else (None, None)."""
    if not (params.logprobs or params.top_logprobs):
        return None, None
    chosen, best = token_logprobs(logits, token, params.top_logprobs)
    top = None if best is None else tuple((int(i), float(v)) for i, v in zip(best[0][0], best[1][0]))
    return float(chosen[0]), top


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int = 0):
    """Log-probabilities of `tokens` [B] under logits [B, V], and the `top` best (ids, logprobs): each logit
    minus the row's logsumexp, the best from `top_k` (equal values by id), not a log_softmax and a topk over the
    whole vocabulary (~0.8 ms a 248,320-logit row here, every token of a request that asks for logprobs)."""
    x = logits.float()
    lse = torch.logsumexp(x, -1)
    chosen = x.gather(-1, tokens[:, None])[:, 0] - lse
    if top:
        best = [top_k(row, top) for row in x]
        ids = torch.stack([i for _, i in best])
        return chosen, (ids, torch.stack([v for v, _ in best]) - lse[:, None])
    return chosen, None


def speculative_accept(p: torch.Tensor, q: torch.Tensor, draft: int, generator: torch.Generator | None) -> tuple[bool, int]:
    """The speculative sampling rule for one drafted token: p, q [V] the target's and the draft's probabilities
    (the same processing, Sampler.distribution), `draft` drawn from q. Keep it with probability
    min(1, p/q); else draw from the normalized residual max(0, p - q). Either way the token is distributed
    exactly as p. Returns (kept, token)."""
    pd, qd = float(p[draft]), float(q[draft])
    u = float(torch.rand((), generator=generator))
    if qd > 0 and u * qd < pd:
        return True, draft
    residual = (p - q).clamp_min(0)
    if not float(residual.sum()) > 0:  # p == q up to rounding: no residual mass, p itself is the answer
        residual = p
    return False, draw(residual, generator)
