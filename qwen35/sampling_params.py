"""SamplingParams: what a request asks of sampling (frozen, checked when made), and the model card's presets.

Each value is checked by type first: a string, a bool or a float count would otherwise fail deep in torch
(or, for max_tokens=2.5, quietly generate 3 tokens). The processing order is the Sampler's (sampling.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .config_fields import is_number
from .constrain import Structured
from .errors import SamplingError


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

        # types first: a string, a bool or a float count would otherwise fail deep in torch (or, for
        # max_tokens=2.5, quietly generate 3 tokens)
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            if not is_number(getattr(self, name)):
                bad(name, "must be a finite number")
        for name in ("top_k", "max_tokens", "top_logprobs", "max_thinking_tokens", "seed"):
            v = getattr(self, name)
            if not (v is None and name in ("max_thinking_tokens", "seed")) and (
                    isinstance(v, bool) or not isinstance(v, int)):
                bad(name, "must be an integer")
        for name in ("logprobs", "ignore_eos", "break_thinking_loops"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be True or False")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            bad("seed", "must fit in 64 bits")
        if any(isinstance(t, bool) or not isinstance(t, int) for t in self.stop_token_ids):
            bad("stop_token_ids", "must be integer token ids (one outside the vocabulary, e.g. -1, never stops)")
        for k, v in dict(self.logit_bias).items():
            if isinstance(k, bool) or not isinstance(k, int) or not is_number(v):
                bad("logit_bias", f"maps integer token ids to finite numbers (entry {k!r}: {v!r})")
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
