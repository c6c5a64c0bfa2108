"""Per-row steering of a generation: a grammar on the answer only, a thinking budget, reasoning-loop breaking.

Phases. With the prompt ending in `<think>` (thinking on), the row starts in reasoning: tokens are free (a
constrained request may not end its turn there: the answer must still come). The reasoning ends when the
model writes `</think>`, or when the budget (`max_thinking_tokens`) is spent, or when the reasoning loops
(`break_thinking_loops`: its tail is one span repeated); in the last two cases `</think>` is inserted for
the model. With a grammar, the template's newlines after `</think>` follow (inserted too, as the template
writes them), and from the answer's first token on every token is masked to the grammar; an end-of-turn
token is allowed only once the grammar accepts. With thinking off the answer starts at the first token.

Everything here works on token ids; `make_guide` binds a request's SamplingParams to a tokenizer once (the
grammar compiled, the control ids looked up), and `GuideSpec.start(prompt)` gives each row its own state,
so the rows of a batch never share one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .constrain import Grammar, engine_for
from .errors import Qwen35Error

# reasoning_effort -> max_thinking_tokens ("none" / "minimal" turn thinking off, as before; "high": no limit
# but max_tokens). Chosen from the model card's guidance: a short think for low, a real one for medium.
EFFORT_BUDGETS = {"low": 1024, "medium": 8192, "high": None}

# a reasoning loop: the tail is one span of 1..LOOP_MAX_SPAN tokens repeated until it covers at least
# LOOP_MIN_TOKENS tokens, and at least LOOP_MIN_REPEATS times (so "the the the" needs 64 tokens of it, a
# 20-token sentence 4 repeats)
LOOP_MAX_SPAN, LOOP_MIN_TOKENS, LOOP_MIN_REPEATS = 128, 64, 3


def loop_span(tokens: Sequence[int]) -> int:
    """The length of the span the tail of `tokens` repeats (a reasoning loop), or 0."""
    n = len(tokens)
    last = tokens[-1] if n else None
    for k in range(1, min(LOOP_MAX_SPAN, n // LOOP_MIN_REPEATS) + 1):
        if tokens[n - 1 - k] != last:  # cheap test first: a period-k tail repeats its last token k back
            continue
        need = max(LOOP_MIN_TOKENS, LOOP_MIN_REPEATS * k)
        if need > n:
            continue
        tail = tokens[n - need:]
        if all(tail[i] == tail[i - k] for i in range(k, need)):
            return k
    return 0


@dataclass(frozen=True)
class GuideSpec:
    """A request's steering, bound to a tokenizer. `start(prompt)` makes one row's state."""

    think_open: int | None
    think_close: int | None
    close_suffix: tuple[int, ...]  # what the template writes after </think> before the answer
    whitespace: frozenset  # ids whose text is whitespace only (to find a trailing <think> in a prompt)
    stop_ids: tuple[int, ...]
    grammar: Grammar | None = None
    max_thinking_tokens: int | None = None
    break_loops: bool = False

    def thinking_open(self, prompt: Sequence[int]) -> bool:
        """Does the prompt end inside an open think block (`<think>` then only whitespace)?"""
        for t in reversed(prompt):
            if t == self.think_open:
                return True
            if t not in self.whitespace:
                return False
        return False

    def start(self, prompt: Sequence[int]) -> Guide:
        return Guide(self, self.thinking_open(prompt))


class Guide:
    """One row: `forced()` (a token to insert instead of sampling, or None), `mask(logits)`, then
    `advance(token)` with whatever was chosen; `cut` says why the reasoning was closed for the model."""

    def __init__(self, spec: GuideSpec, reasoning: bool):
        self.spec = spec
        self.reasoning = reasoning
        self.thinking: list[int] = []  # reasoning tokens so far
        self.queue: list[int] = []  # tokens to insert, in order
        self.matcher = None if spec.grammar is None else spec.grammar.matcher()
        self.cut: str | None = None  # "budget" or "loop" once the reasoning was closed for the model
        if reasoning and spec.max_thinking_tokens == 0:
            self._close("budget")

    def _close(self, why: str | None) -> None:
        self.queue = [self.spec.think_close, *self.spec.close_suffix]
        self.cut = why

    def forced(self) -> int | None:
        return self.queue[0] if self.queue else None

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [1, V] as this row may sample them now (the same tensor when nothing is forbidden)."""
        if self.reasoning:
            if self.matcher is None:
                return logits
            # the constrained answer must come: no end of turn inside the reasoning (numpy: see Matcher.mask_logits)
            x = logits.detach().float().cpu().numpy().copy()
            x[:, list(self.spec.stop_ids)] = -np.inf
            return torch.from_numpy(x)
        return logits if self.matcher is None else self.matcher.mask_logits(logits)

    def advance(self, token: int) -> None:
        if self.queue and token == self.queue[0]:
            self.queue.pop(0)
            if token == self.spec.think_close and self.reasoning:
                self.reasoning = False
            return
        if self.reasoning:
            if token == self.spec.think_close:
                self.reasoning = False
                if self.matcher is not None:
                    self.queue = list(self.spec.close_suffix)
                return
            self.thinking.append(token)
            budget = self.spec.max_thinking_tokens
            if budget is not None and len(self.thinking) >= budget:
                self._close("budget")
            elif self.spec.break_loops and loop_span(self.thinking):
                self._close("loop")
            return
        if self.matcher is not None:
            self.matcher.advance(token)


def make_guide(params, tokenizer, vocab_size: int) -> GuideSpec | None:
    """The request's GuideSpec, or None when it needs no steering (then decoding is untouched)."""
    if params.structured is None and params.max_thinking_tokens is None and not params.break_thinking_loops:
        return None
    grammar = None
    if params.structured is not None:
        grammar = engine_for(tokenizer, vocab_size).compile(params.structured)
    think_open, think_close = tokenizer.token_to_id("<think>"), tokenizer.token_to_id("</think>")
    if think_close is None and (params.max_thinking_tokens is not None or params.break_thinking_loops):
        raise Qwen35Error("a thinking budget needs a tokenizer with <think> / </think> tokens")
    return GuideSpec(think_open, think_close, tuple(tokenizer.encode("\n\n")), _whitespace_ids(tokenizer),
                     tuple(params.stop_token_ids or tokenizer.eos_token_ids), grammar, params.max_thinking_tokens,
                     params.break_thinking_loops)


def _whitespace_ids(tokenizer) -> frozenset:
    cached = getattr(tokenizer, "_whitespace_ids", None)
    if cached is None:
        cached = frozenset(tokenizer.encode(s)[0] for s in ("\n", "\n\n", " ", "\n\n\n") if len(tokenizer.encode(s)) == 1)
        tokenizer._whitespace_ids = cached
    return cached
