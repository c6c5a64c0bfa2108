"""Token-level generation: prefill in chunks, then decode one token per step.

`generate_step` (one sequence) and `batch_generate` (several, left-padded into one batch) know token ids
only; text, chat templates and tool calls live in the layers above. Both respect a context limit: a
prompt plus max_tokens beyond it is refused with ContextLengthError before any work is done, because
recurrent state cannot be "shifted" the way a KV window can.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .cache import HybridCache
from .errors import Qwen35Error
from .runtime import tune_allocator
from .sampling import Sampler, SamplingParams, step_logprobs

DEFAULT_PREFILL_CHUNK = 512


class ContextLengthError(Qwen35Error, ValueError):
    """prompt + max_tokens does not fit the model's context."""


@dataclass(frozen=True)
class StepOutput:
    token: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None
    finish_reason: str | None = None  # None while going on, then "stop" or "length"


def max_context(model) -> int:
    return model.config.max_position_embeddings


def check_context(model, used: int, prompt_len: int, max_tokens: int) -> None:
    limit = max_context(model)
    if used + prompt_len + max_tokens > limit:
        raise ContextLengthError(
            f"prompt ({prompt_len} tokens{f' after {used} cached' if used else ''}) + max_tokens ({max_tokens}) = "
            f"{used + prompt_len + max_tokens} exceeds the context of {limit} tokens; shorten the prompt or lower "
            f"max_tokens"
        )


def prefill(model, ids: torch.Tensor, cache: HybridCache, chunk_size: int = DEFAULT_PREFILL_CHUNK) -> torch.Tensor:
    """Feed ids [B, T] in chunks of `chunk_size` (bounded activation memory for very long prompts);
    the vocabulary projection runs for the last position only. Returns fp32 logits [B, vocab]."""
    if chunk_size < 1:
        raise ValueError(f"prefill chunk size must be >= 1, got {chunk_size}")
    T = ids.shape[1]
    logits = None
    for start in range(0, T, chunk_size):
        end = min(T, start + chunk_size)
        if end < T:
            model.hidden_states(ids[:, start:end], cache=cache)
        else:
            logits = model(ids[:, start:end], cache=cache, logits_to_keep=1)[:, -1]
    return logits


def _as_ids(prompt) -> list[int]:
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() == 2 and prompt.shape[0] == 1:
            prompt = prompt[0]
        if prompt.dim() != 1:
            raise ValueError(f"prompt_ids must be one sequence [T], got shape {tuple(prompt.shape)}")
        return prompt.tolist()
    return [int(t) for t in prompt]


def _step_output(logits: torch.Tensor, tok: torch.Tensor, params: SamplingParams, finish: str | None) -> StepOutput:
    lp, top = step_logprobs(logits, tok, params)
    return StepOutput(int(tok[0]), lp, top, finish)


def generate_step(
    model,
    prompt_ids,
    cache: HybridCache | None = None,
    sampler: Sampler | None = None,
    params: SamplingParams | None = None,
    prefill_chunk_size: int = DEFAULT_PREFILL_CHUNK,
) -> Iterator[StepOutput]:
    """Yield generated tokens one by one for a single sequence.

    prompt_ids: list of ids or LongTensor [T] (>= 1 token), fed after whatever `cache` already holds.
    sampler / params: a Sampler, or SamplingParams to build one (default SamplingParams()).
    Stops after a stop token (yielded with finish_reason "stop") or max_tokens ("length"). On return the
    cache holds the prompt and every yielded token except the last one.
    """
    tune_allocator()
    if sampler is not None and params is None:
        params = sampler.params
    params = params or SamplingParams()
    ids = _as_ids(prompt_ids)
    if not ids:
        raise ValueError("prompt_ids is empty: at least one token is needed to predict the next")
    if cache is None:
        cache = model.make_cache(batch_size=1)
    if cache.batch_size != 1:
        raise ValueError(f"generate_step runs one sequence; the cache has batch size {cache.batch_size}")
    check_context(model, cache.offset, len(ids), params.max_tokens)
    if sampler is None:
        sampler = Sampler(params, model.config.vocab_size, 1, [ids])
    stop = set(params.stop_token_ids)
    with torch.inference_mode():
        logits = prefill(model, torch.tensor([ids], device=model.device), cache, prefill_chunk_size)
        for i in range(params.max_tokens):
            tok = sampler(logits)
            sampler.observe(tok)
            finish = "stop" if int(tok[0]) in stop else ("length" if i == params.max_tokens - 1 else None)
            yield _step_output(logits, tok, params, finish)
            if finish:
                return
            logits = model(tok[:, None].to(model.device), cache=cache)[:, -1]


def batch_generate(
    model,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | None = None,
    prefill_chunk_size: int = DEFAULT_PREFILL_CHUNK,
) -> list[list[StepOutput]]:
    """Generate for several prompts at once (left-padded into one batch; padding never reaches the
    conv window, the recurrent state or attention). Greedy results equal running each prompt alone.
    Returns one list of StepOutput per prompt, each ending with its finish_reason."""
    tune_allocator()
    params = params or SamplingParams()
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("batch_generate needs at least one prompt, each with >= 1 token")
    B, T = len(prompts), max(len(p) for p in prompts)
    for p in prompts:
        check_context(model, 0, len(p), params.max_tokens)
    pad = torch.tensor([T - len(p) for p in prompts])
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    cache = model.make_cache(batch_size=B)
    if int(pad.max()) > 0:
        cache.pad = pad
    sampler = Sampler(params, model.config.vocab_size, B, prompts)
    stop = set(params.stop_token_ids)
    outputs: list[list[StepOutput]] = [[] for _ in range(B)]
    done = [False] * B
    with torch.inference_mode():
        logits = prefill(model, ids, cache, prefill_chunk_size)
        for i in range(params.max_tokens):
            toks = sampler(logits)
            sampler.observe(toks)
            for b in range(B):
                if done[b]:
                    continue
                t = int(toks[b])
                finish = "stop" if t in stop else ("length" if i == params.max_tokens - 1 else None)
                outputs[b].append(_step_output(logits[b : b + 1], toks[b : b + 1], params, finish))
                done[b] = finish is not None
            if all(done):
                break
            logits = model(toks[:, None], cache=cache)[:, -1]
    return outputs
