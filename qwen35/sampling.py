"""Sampling: SamplingParams and the Sampler that turns logits into tokens.

Order of processing (each step, per sequence): logit_bias -> repetition penalty (prompt + generated
tokens, CTRL-style: divide positive logits, multiply negative ones) -> presence and frequency penalties
(generated tokens only, OpenAI-style) -> temperature -> top_k -> top_p -> min_p -> draw.
temperature 0 is greedy (argmax after biases and penalties). Randomness comes only from a
torch.Generator seeded from `seed`, so a seed reproduces a run exactly.
Logprobs are those of the model's own distribution (log_softmax of the raw logits), as OpenAI reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from .constrain import Structured
from .errors import Qwen35Error


class SamplingError(Qwen35Error, ValueError):
    """A sampling parameter is out of range; the message names it."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    max_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()  # empty: the tokenizer's end-of-turn ids (see with_stops)
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False  # generate to max_tokens: no default stop ids
    # what the answer must be (constrain.Structured: JSON schema, JSON object, regex, Lark, tool calls); the
    # reasoning before </think> stays free (guide.py)
    structured: Structured | None = None
    max_thinking_tokens: int | None = None  # close the reasoning with </think> after this many tokens
    break_thinking_loops: bool = False  # close the reasoning when its tail repeats one span (guide.loop_span)

    def __post_init__(self):
        def bad(name: str, why: str):
            raise SamplingError(f"{name}={getattr(self, name)!r}: {why}")

        if not self.temperature >= 0:
            bad("temperature", "must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            bad("top_k", "must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        if not -2 <= self.presence_penalty <= 2:
            bad("presence_penalty", "must be in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            bad("frequency_penalty", "must be in [-2, 2]")
        if not self.repetition_penalty > 0:
            bad("repetition_penalty", "must be > 0 (1 = off)")
        if self.max_tokens < 1:
            bad("max_tokens", "must be >= 1")
        if not 0 <= self.top_logprobs <= 20:
            bad("top_logprobs", "must be in [0, 20]")
        if self.structured is not None and not isinstance(self.structured, Structured):
            bad("structured", "must be a qwen35.constrain.Structured (e.g. Structured.json_schema(schema))")
        if self.structured is not None and self.ignore_eos:
            bad("ignore_eos", "cannot be combined with structured output (the grammar ends the answer)")
        if self.max_thinking_tokens is not None and self.max_thinking_tokens < 0:
            bad("max_thinking_tokens", "must be >= 0")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "logit_bias", {int(k): float(v) for k, v in dict(self.logit_bias).items()})

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def constrained(self) -> bool:
        """A guide steers this request token by token (grammar, thinking budget, loop breaking): its tokens
        depend on its own position in the grammar and the reasoning, so speculative decoding must not draft
        for it (a draft would skip the mask and the inserted </think>)."""
        return self.structured is not None or self.max_thinking_tokens is not None or self.break_thinking_loops

    def with_stops(self, eos_token_ids) -> SamplingParams:
        """These params with the tokenizer's end-of-turn ids as stop ids, unless stop ids were given or
        ignore_eos is set (the one place that default is filled in)."""
        if self.stop_token_ids or self.ignore_eos:
            return self
        return replace(self, stop_token_ids=tuple(eos_token_ids))


# The model card's recommended sampling for general use, thinking and non-thinking.
THINKING_PRESET = SamplingParams(temperature=1.0, top_p=0.95, top_k=20, min_p=0.0, presence_penalty=1.5)
NON_THINKING_PRESET = SamplingParams(temperature=0.7, top_p=0.8, top_k=20, min_p=0.0, presence_penalty=1.5)


def preset(thinking: bool) -> SamplingParams:
    """The model card's recommended sampling for thinking / non-thinking general use."""
    return THINKING_PRESET if thinking else NON_THINKING_PRESET


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1) of logits [B, V]: the same index (the first maximum; NaN counts as the largest, as in
    torch), found as the largest of 8 segments' maxima. torch's argmax along one long row runs serially
    without SIMD (354 us for 248,320 logits here, ~1.5% of a 0.8B int4 token); max over segments
    vectorizes and splits across threads (73 us). Tested against argmax with ties, NaN and infinities."""
    B, V = x.shape
    if V % 8 or V < 4096:
        return x.argmax(-1)
    v, i = x.reshape(B, 8, V // 8).max(-1)
    h = v.argmax(-1)
    return h * (V // 8) + i.gather(1, h[:, None])[:, 0]


class Sampler:
    """Stateful per batch: remembers generated-token counts (penalties) and the generator (seed).

    `prompt_tokens` (list of id lists, one per sequence) feed only the repetition penalty.
    """

    def __init__(self, params: SamplingParams, vocab_size: int, batch_size: int = 1,
                 prompt_tokens: list[list[int]] | None = None, generator: torch.Generator | None = None):
        self.params = params
        self.vocab_size = vocab_size
        for tok in params.logit_bias:
            if not 0 <= tok < vocab_size:
                raise SamplingError(f"logit_bias token id {tok} is outside the vocabulary [0, {vocab_size})")
        self.generator = generator
        if self.generator is None and params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)
        self.counts = torch.zeros(batch_size, vocab_size, dtype=torch.float32)
        self.seen = torch.zeros(batch_size, vocab_size, dtype=torch.bool)  # prompt + generated
        if prompt_tokens is not None and params.repetition_penalty != 1.0:
            for b, toks in enumerate(prompt_tokens):
                self.seen[b, torch.as_tensor(toks, dtype=torch.long)] = True
        self.bias = None
        if params.logit_bias:
            self.bias = torch.zeros(vocab_size)
            for tok, v in params.logit_bias.items():
                self.bias[tok] = v
        # no bias, no penalty: processing would only copy the logits, and the counts are never read
        self.plain = (self.bias is None and params.repetition_penalty == 1.0 and not params.presence_penalty
                      and not params.frequency_penalty)

    def process(self, logits: torch.Tensor, pending: Sequence[int] = ()) -> torch.Tensor:
        """Biases and penalties applied to fp32 logits [B, V] (a new tensor). pending: tokens counted as if
        observed (a speculative draft's earlier tokens), for one row (B = 1)."""
        p = self.params
        x = logits.float().clone()
        if self.bias is not None:
            x += self.bias
        penalised = p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
        counts, seen = self.counts, self.seen
        if pending and penalised:
            counts, seen = counts.clone(), seen.clone()
            for t in pending:
                counts[0, t] += 1
                seen[0, t] = True
        if p.repetition_penalty != 1.0:
            pen = torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty)
            x = torch.where(seen, pen, x)
        if p.presence_penalty:
            x -= p.presence_penalty * (counts > 0)
        if p.frequency_penalty:
            x -= p.frequency_penalty * counts
        return x

    def distribution(self, logits: torch.Tensor, pending: Sequence[int] = ()) -> torch.Tensor:
        """The probabilities [B, V] a (non-greedy) draw takes its token from: processed logits, temperature,
        top_k, top_p, min_p, softmax. Speculative sampling applies the same to the draft and the target."""
        p = self.params
        x = self.process(logits, pending) / p.temperature
        if p.top_k and p.top_k < x.shape[-1]:
            kth = x.topk(p.top_k, dim=-1).values[..., -1:]
            x = x.masked_fill(x < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_x, idx = x.sort(dim=-1, descending=True)
            probs = sorted_x.softmax(-1)
            # drop a token when the tokens before it already reach top_p (the first always stays)
            drop = (probs.cumsum(-1) - probs) >= p.top_p
            x = x.scatter(-1, idx, sorted_x.masked_fill(drop, float("-inf")))
        if p.min_p > 0:
            probs = x.softmax(-1)
            x = x.masked_fill(probs < p.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
        return x.softmax(-1)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] -> tokens [B] (long). Call `observe(tokens)` after accepting them."""
        if self.params.greedy:
            return argmax(logits.float() if self.plain else self.process(logits))
        return torch.multinomial(self.distribution(logits), 1, generator=self.generator)[:, 0]

    def observe(self, tokens: torch.Tensor) -> None:
        """Count accepted tokens [B] for the penalties (nothing to count without them)."""
        if self.plain:
            return
        rows = torch.arange(tokens.shape[0])
        self.counts[rows, tokens] += 1
        self.seen[rows, tokens] = True


def step_logprobs(logits: torch.Tensor, token: torch.Tensor, params: SamplingParams):
    """(logprob of `token` [1], top logprobs as ((id, logprob), ...)) as params ask, else (None, None)."""
    if not (params.logprobs or params.top_logprobs):
        return None, None
    chosen, best = token_logprobs(logits, token, params.top_logprobs)
    top = None if best is None else tuple((int(i), float(v)) for i, v in zip(best[0][0], best[1][0]))
    return float(chosen[0]), top


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int = 0):
    """Log-probabilities of `tokens` [B] under logits [B, V], and the `top` best (ids, logprobs)."""
    logp = logits.float().log_softmax(-1)
    chosen = logp.gather(-1, tokens[:, None])[:, 0]
    if top:
        vals, ids = logp.topk(top, dim=-1)
        return chosen, (ids, vals)
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
    return False, int(torch.multinomial(residual, 1, generator=generator))
