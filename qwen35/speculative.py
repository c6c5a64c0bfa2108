"""Speculative decoding with the checkpoint's own MTP head: draft k tokens, verify them in one forward.

Each round: the MTP head drafts k tokens (its first draft from the target model's true hidden states, the
next ones chained on its own output hidden), then the target model runs [last token, draft 1..k] in one
forward of k+1 tokens (the whole-layer kernels read every matrix once for all of them, and compute each
token exactly as its own decode step would). Tokens are then sampled from the verify logits in order, with
the stream's own sampler, and drafting stops at the first sampled token that differs from its draft: every
emitted token is what plain decoding would have sampled from the same logits with the same random draws, so
the output is identical to `generation.generate_step` token for token, greedy or sampled with a seed (the
acceptance rule is "the sample equals the draft", exact for any sampler; the min(1, p/q) rule would accept
more sampled drafts, not greedy ones).

Rollback costs nothing: the verify forward keeps the Gated DeltaNet state after each token
(`HybridCache.keep_steps`), `rewind` picks the one after the last kept token and cuts the KV by length; the
MTP head's own KV is cut back to the entries built from true hidden states (`truncate`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .cache import HybridCache
from .model.qwen35 import InputError
from .generation import DEFAULT_PREFILL_CHUNK, Response, Stream, _as_ids, check_context
from .sampling import SamplingParams

MAX_DRAFT_TOKENS = 7  # k + 1 verify tokens per row must fit the whole-layer kernels (ops/fast.LAYER_MAX_TOKENS)


@dataclass
class SpeculativeStats:
    """Per draft position i (0-based): how many rounds drafted a token there and how many were accepted."""

    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    rounds: int = 0

    def record(self, k: int, accepted: int) -> None:
        while len(self.drafted) < k:
            self.drafted.append(0)
            self.accepted.append(0)
        self.rounds += 1
        for i in range(k):
            self.drafted[i] += 1
            self.accepted[i] += int(i < accepted)

    @property
    def acceptance(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted, self.drafted)]

    def as_dict(self) -> dict:
        return {"rounds": self.rounds, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance_per_position": [round(a, 4) for a in self.acceptance]}


def _hidden_chunks(model, ids: torch.Tensor, cache: HybridCache, chunk: int) -> torch.Tensor:
    """The prompt's final hidden states [1, T, H] (the MTP head needs every position), prefilled in chunks."""
    return torch.cat([model.hidden_states(ids[:, s : s + chunk], cache) for s in range(0, ids.shape[1], chunk)], 1)


def speculative_generate_step(
    model,
    prompt_ids,
    params: SamplingParams | None = None,
    draft_tokens: int = 2,
    stats: SpeculativeStats | None = None,
    prefill_chunk_size: int = DEFAULT_PREFILL_CHUNK,
) -> Iterator[Response]:
    """`generation.generate_step` with MTP drafting (same tokens, same Responses); `stats` collects the
    acceptance per draft position."""
    if model.mtp is None:
        raise InputError("speculative decoding drafts with the checkpoint's MTP head, and this one has none")
    if not 1 <= draft_tokens <= MAX_DRAFT_TOKENS:
        raise InputError(f"draft_tokens must be 1..{MAX_DRAFT_TOKENS}, got {draft_tokens}")
    params = params or SamplingParams()
    ids = _as_ids(prompt_ids)
    if not ids:
        raise ValueError("prompt_ids is empty: at least one token is needed to predict the next")
    check_context(model, 0, len(ids), params.max_tokens + draft_tokens)  # a verify pass may run k past the end
    stats = stats if stats is not None else SpeculativeStats()
    cache, mcache = model.make_cache(batch_size=1), model.make_mtp_cache(batch_size=1)
    stream = Stream.start(model, ids, params)
    prompt = torch.tensor([ids], device=model.device)
    with torch.no_grad():
        hidden = _hidden_chunks(model, prompt, cache, prefill_chunk_size)
        r = stream.sample(model.logits(hidden[:, -1:])[:, -1])
        for s in range(0, len(ids) - 1, prefill_chunk_size):  # the MTP head's KV over the prompt's pairs
            e = min(len(ids) - 1, s + prefill_chunk_size)
            model.mtp_forward(hidden[:, s:e], prompt[:, s + 1 : e + 1], mcache)
    yield r
    pend_h, pend_ids = hidden[:, -1:], [r.token]  # MTP pairs (true hidden at p, token p+1) not yet fed
    del hidden
    cache.keep_steps(True)
    while r.finish_reason is None:
        k = min(draft_tokens, params.max_tokens - len(stream.generated) - 1)
        with torch.no_grad():
            drafts = []
            if k > 0:
                logits, h = model.mtp_forward(pend_h, torch.tensor([pend_ids], device=model.device), mcache)
                exact = mcache.lengths
                drafts.append(int(logits[0, -1].argmax()))
                for _ in range(k - 1):
                    logits, h = model.mtp_forward(h[:, -1:], torch.tensor([[drafts[-1]]], device=model.device),
                                                  mcache)
                    drafts.append(int(logits[0, -1].argmax()))
                mcache.truncate(exact)  # chained drafts used the head's own hidden: not kept
            tokens = [stream.last] + drafts
            vh = model.hidden_states(torch.tensor([tokens], device=model.device), cache)
            vlogits = model.logits(vh)
        kept = accepted = 0  # verify tokens the cache keeps; drafts equal to what was sampled
        for i in range(len(tokens)):
            r = stream.sample(vlogits[:, i])
            kept += 1
            hit = i < len(drafts) and r.token == drafts[i]
            accepted += hit
            yield r
            if r.finish_reason is not None or not hit:
                break
        stats.record(len(drafts), accepted)
        if r.finish_reason is not None:
            break
        cache.rewind([kept])
        pend_h, pend_ids = vh[:, :kept], tokens[1:kept] + [r.token]
