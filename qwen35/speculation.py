"""How a caller asks for speculative decoding (`Speculation`), the head its drafts come from (`DraftHead`: the
MTP head's vocabulary projection, or a reduced draft vocabulary of it) and one request's drafting state
(`DraftRow`). The draft / verify / rollback algorithm is speculative.py's."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .draft_policy import ADAPTIVE_MAX_DRAFTS, RoundCosts, SpeculativeStats
from .errors import Qwen35Error
from .ops.linear import linear
from .sampling_params import SamplingParams

MAX_DRAFT_TOKENS = 7  # k + 1 verify tokens per row must fit the whole-layer kernels (ops/fast.LAYER_MAX_TOKENS)
MAX_VERIFY_ROWS = 64  # rows x tokens the whole-layer kernels take in one call (ops/layer_decode.layer_decoding)


class SpeculativeError(Qwen35Error, ValueError):
    """Speculative decoding cannot run as asked (no MTP head, k out of range, a bad draft vocabulary)."""


def drafting_allowed(params: SamplingParams) -> tuple[bool, str]:
    """Whether a request with these params may draft, and if not why (its stats say so). Every speculative
    entry point asks this once per request. Constrained decoding (response_format, a forced tool call, a
    thinking budget) must turn drafting off here until the grammar state advances and rolls back with the
    verified positions."""
    if params.constrained:
        return False, ("constrained decoding (structured output, a forced tool call, a thinking budget or loop "
                       "breaking): drafts would skip the grammar mask and the inserted </think>")
    return True, ""


@dataclass
class Speculation:
    """How to draft, and what drafting measured.

    draft_tokens: k fixed (1..7), or None for adaptive k in 1..4 (draft_policy), which also turns drafting off
    for a request when its measured acceptance makes drafting slower than plain decoding.
    draft_vocab: draft over only the first N token ids (BPE merge order, so roughly the most frequent tokens of
    the tokenizer's training text) plus `always_draft` (e.g. the end-of-turn ids); None: the full vocabulary.
    The verify pass always uses the full head, so the output is unaffected; only acceptance can drop.
    stats: totals over every request; last: the most recent request's own stats.
    propose: benchmarks and tests only: (tokens so far, the head's greedy draft) -> the draft to verify
    instead (a controlled acceptance rate through the real draft/verify/rollback path; greedy requests)."""

    draft_tokens: int | None = None
    draft_vocab: int | None = None
    always_draft: tuple[int, ...] = ()
    stats: SpeculativeStats = field(default_factory=SpeculativeStats)
    last: SpeculativeStats = field(default_factory=SpeculativeStats)
    costs: RoundCosts = field(default_factory=RoundCosts)
    propose: Callable[[list[int], int], int] | None = None

    def __post_init__(self):
        if self.draft_tokens is not None and not 1 <= self.draft_tokens <= MAX_DRAFT_TOKENS:
            raise SpeculativeError(f"draft_tokens must be 1..{MAX_DRAFT_TOKENS}, got {self.draft_tokens}")
        if self.draft_vocab is not None and self.draft_vocab < 1:
            raise SpeculativeError(f"draft_vocab must be >= 1 tokens, got {self.draft_vocab}")
        self._heads: dict[int, DraftHead] = {}

    @property
    def max_k(self) -> int:
        return self.draft_tokens or ADAPTIVE_MAX_DRAFTS

    def head(self, model) -> DraftHead:
        if model.mtp is None:
            raise SpeculativeError("speculative decoding drafts with the checkpoint's MTP head (mtp.* tensors), "
                                   "and this checkpoint has none")
        key = id(model)
        if key not in self._heads:
            self._heads[key] = DraftHead(model, self.draft_vocab, self.always_draft)
        return self._heads[key]

    def new_row(self, params: SamplingParams) -> DraftRow:
        """The drafting state of one new request (drafting_allowed decides whether it drafts at all)."""
        ok, why = drafting_allowed(params)
        if self.propose is not None and not params.greedy:
            raise SpeculativeError("Speculation.propose replaces greedy drafts only (temperature 0)")
        row = DraftRow(SpeculativeStats())
        if not ok:
            row.turn_off(why, self.stats, "not_allowed")
        self.last = row.stats
        return row


class DraftHead:
    """The vocabulary projection the drafts use: the model's head, or its rows of the draft vocabulary (a
    copy in the same format, so a bf16 or quantized head keeps its fast GEMV)."""

    def __init__(self, model, n: int | None, always: Sequence[int] = ()):
        self.model, self.ids, self.weight = model, None, None
        V = model.config.vocab_size
        if n is None or n >= V:
            return
        ids = sorted(set(range(n)) | {int(t) for t in always if 0 <= int(t) < V})
        self.ids = torch.tensor(ids, dtype=torch.long, device=model.device)
        head = model.head_runtime if model.head_runtime is not None else model.head_weight
        from .ops.fast import GemvWeight
        from .quant.weight import QuantizedWeight

        if isinstance(head, QuantizedWeight):
            w = QuantizedWeight(head.scheme, head.qs[self.ids].contiguous(), head.d[self.ids].contiguous(),
                                head.shape[1])
            w.kernels, w.dtype = head.kernels, head.dtype
            self.weight = w
        else:
            rows = (head.weight if isinstance(head, GemvWeight) else head)[self.ids].contiguous()
            self.weight = GemvWeight(rows) if isinstance(head, GemvWeight) else rows

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 draft logits [..., N] (N: the draft vocabulary) of MTP hidden states [..., H]."""
        return self.model.logits(h) if self.ids is None else linear(h, self.weight, out_fp32=True)

    def full(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft logits [1, N] as [1, vocab], -inf outside the draft vocabulary (for the sampler's processing)."""
        if self.ids is None:
            return logits
        out = logits.new_full((logits.shape[0], self.model.config.vocab_size), float("-inf"))
        return out.index_copy_(1, self.ids, logits)

    def token(self, i: int) -> int:
        return i if self.ids is None else int(self.ids[i])


class DraftRow:
    """One request's drafting state: the MTP pairs (true hidden at p, token p+1) not yet fed to the head,
    whether it still drafts, and its stats."""

    def __init__(self, stats: SpeculativeStats):
        self.stats = stats
        self.on = True
        self.pending_h: list[torch.Tensor] = []  # [H] each
        self.pending_ids: list[int] = []

    def turn_off(self, reason: str, totals: SpeculativeStats, kind: str) -> None:
        """No more drafting for this request: `reason` goes into its stats, `kind` (a short label: "loss",
        "not_allowed", "error") into the totals' count of requests turned off."""
        if self.on:
            self.on = False
            self.stats.turn_off(reason)
            totals.requests_off[kind] = totals.requests_off.get(kind, 0) + 1
        self.pending_h, self.pending_ids = [], []
