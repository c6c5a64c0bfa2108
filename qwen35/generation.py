"""Token-level generation: prefill in chunks, then one decode loop for one sequence or many.

Everything that generates (generate_step, batch_generate, the text layer in api.py, ChatSession and the
server engine) goes through the same three pieces, so a change to how a token is produced (speculative
decoding) is made once:
- `Response`: the one record per generated token (id, logprobs, finish reason; the text layer fills in
  the text delta and timings; the server an error);
- `Stream`: one sequence being generated: its sampler and the one finish rule (`finish_reason`);
- `step(model, cache, streams)`: feed every stream's last token (row b of the cache is streams[b]) and
  sample each stream's next token(s).

A prompt plus max_tokens beyond the context is refused with ContextLengthError before any work is done,
because recurrent state cannot be "shifted" the way a KV window can.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from . import threads
from .cache import HybridCache
from .errors import Qwen35Error
from .model.qwen35 import InputError
from .sampling import Sampler, SamplingParams, step_logprobs

DEFAULT_PREFILL_CHUNK = 512
RESERVE_DECODE_TOKENS = 1024  # KV room made before prefill for the tokens to be generated (generate_step)


class ContextLengthError(Qwen35Error, ValueError):
    """prompt + max_tokens does not fit the model's context."""


@dataclass
class Response:
    """One generated token, as every layer reports it.

    token: the id (None only for a server-side end without a token: cancelled, timeout, error);
    finish_reason: None while going on, then "stop" (a stop token, which is `token`) or "length" (the server
    adds "cancelled", "timeout"). text: the new complete UTF-8 text since the previous response, the stop
    token's own text excluded (filled by the text layer; "" at the token level).
    """

    token: int | None
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None
    finish_reason: str | None = None
    text: str = ""
    error: str | None = None
    reasoning_cut: str | None = None  # on an inserted </think>: "budget" or "loop" (guide.py)
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens restored from a snapshot instead of prefilled
    generation_tokens: int = 0
    prefill_tok_s: float = 0.0
    decode_tok_s: float = 0.0
    peak_rss_mb: float = 0.0


StepOutput = Response  # the token-level name of the same record


def finish_reason(token: int, index: int, params: SamplingParams) -> str | None:
    """The one stop rule: the index-th generated token (from 0) ends generation with "stop" if it is a stop
    token, with "length" if it is the max_tokens-th, else not at all."""
    if token in params.stop_token_ids:
        return "stop"
    return "length" if index + 1 >= params.max_tokens else None


class Stream:
    """One sequence being generated: samples its next token from logits and applies the stop rule.
    guide: this row's steering (guide.Guide: grammar mask, inserted </think>), or None."""

    def __init__(self, params: SamplingParams, sampler: Sampler, guide=None):
        if guide is None and params.constrained:
            raise Qwen35Error("these SamplingParams constrain the output (structured, max_thinking_tokens or "
                              "break_thinking_loops), which needs the tokenizer: generate through stream_generate, "
                              "or pass guide=qwen35.guide.make_guide(params, tokenizer, vocab_size).start(prompt)")
        self.params, self.sampler, self.guide = params, sampler, guide
        self.generated: list[int] = []
        self.finish: str | None = None

    @classmethod
    def start(cls, model, prompt: Sequence[int], params: SamplingParams, generator=None, guide=None) -> Stream:
        """guide: the request's guide.GuideSpec (each stream gets its own state from it), or None."""
        return cls(params, Sampler(params, model.config.vocab_size, 1, [list(prompt)], generator=generator),
                   None if guide is None else guide.start(prompt))

    @property
    def last(self) -> int:
        return self.generated[-1]

    def sample(self, logits: torch.Tensor) -> Response:
        """logits [1, vocab] -> the next token's Response (finish_reason set when it ends the stream)."""
        if self.finish is not None:
            raise Qwen35Error(f"stream already finished ({self.finish})")
        g, cut = self.guide, None
        forced = None if g is None else g.forced()
        if forced is not None:
            tok = torch.tensor([forced])
        else:
            tok = self.sampler(logits if g is None else g.mask(logits))
        t = int(tok[0])
        if g is not None:
            g.advance(t)
            cut = g.cut if forced is not None and forced == g.spec.think_close else None
        return self.emit(t, logits, reasoning_cut=cut)

    def emit(self, token: int, logits: torch.Tensor, reasoning_cut: str | None = None) -> Response:
        """Take `token` as the next one (sampled from `logits` [1, vocab], or kept by speculative sampling's
        rule, which draws from the same distribution): penalty counts, stop rule, logprobs."""
        if self.finish is not None:
            raise Qwen35Error(f"stream already finished ({self.finish})")
        tok = torch.tensor([token])
        self.sampler.observe(tok)
        self.finish = finish_reason(token, len(self.generated), self.params)
        self.generated.append(token)
        lp, top = step_logprobs(logits, tok, self.params)
        return Response(token, lp, top, self.finish, reasoning_cut=reasoning_cut,
                        generation_tokens=len(self.generated))


def step(model, cache: HybridCache, streams: Sequence[Stream], isolate: bool = False) -> list[list[Response]]:
    """One decode step: feed each stream's last token (row b of `cache` belongs to streams[b]) and sample
    what comes next. Returns, per stream, the tokens it produced (one per step today).
    isolate: a stream whose sampling raises gets one Response with `error` set (and finishes with "error")
    instead of the exception ending the step for every stream (the server's batches)."""
    tokens = torch.tensor([[s.last] for s in streams], device=cache.layout.device)
    logits = threads.run("decode", lambda: model(tokens, cache=cache)[:, -1])
    out = []
    for b, s in enumerate(streams):
        try:
            out.append([s.sample(logits[b : b + 1])])
        except Exception as e:
            if not isolate:
                raise
            s.finish = "error"
            out.append([Response(None, error=f"{type(e).__name__}: {e}")])
    return out


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
    """Feed ids [B, T] in chunks of `chunk_size` (bounded activation memory for very long prompts), layer by
    layer over groups of chunks where `by_layer` allows; the vocabulary projection runs for the last position
    only. Returns fp32 logits [B, vocab]."""
    if chunk_size < 1:
        raise ValueError(f"prefill chunk size must be >= 1, got {chunk_size}")
    T = ids.shape[1]
    logits = None
    with torch.no_grad():
        if T > chunk_size and by_layer(model, cache):
            # groups of BY_LAYER_CHUNKS chunks: the hidden states of a whole group are held at once, so a
            # 262K-token prompt holds 8K tokens' worth, not all of them (2 GB at the 9B's width)
            group = BY_LAYER_CHUNKS * chunk_size
            run = lambda fn, work: threads.run("prefill", fn, work)
            for start in range(0, T, group):
                part = ids[:, start : start + group]
                if part.shape[1] > chunk_size:
                    h = model.prefill_by_layer(part, cache, chunk_size, run=run)
                else:  # a last group of one chunk
                    h = run(lambda p=part: model.hidden_states(p, cache=cache), part.shape[1])
            return model.logits(h[:, -1:])[:, -1]
        for start in range(0, T, chunk_size):
            end = min(T, start + chunk_size)
            chunk = ids[:, start:end]
            if end < T:
                threads.run("prefill", lambda c=chunk: model.hidden_states(c, cache=cache), end - start)
            else:
                logits = threads.run("prefill", lambda c=chunk: model(c, cache=cache, logits_to_keep=1)[:, -1],
                                     end - start)
    return logits


PREFILL_BY_LAYER = True
BY_LAYER_CHUNKS = 16  # chunks a layer takes in turn before the next layer starts (8,192 tokens at 512)


def by_layer(model, cache: HybridCache) -> bool:
    """Whether a prompt of several chunks is prefilled layer by layer (Qwen35ForCausalLM.prefill_by_layer:
    the same result, bit for bit; quantized weights dequantized once per BY_LAYER_CHUNKS chunks, not per chunk).
    Not while the cache keeps per-token states for speculative rewinds (a verify forward is one chunk)."""
    return (PREFILL_BY_LAYER and hasattr(model, "prefill_by_layer")
            and not any(s.keep_steps for s in getattr(cache, "deltanet", ())))


def as_ids(prompt, vocab_size: int | None = None) -> list[int]:
    """Token ids of one sequence, checked whole before any work (a bad id found in a later chunk would leave
    the earlier chunks in the caller's cache): integers (not floats, not bytes), within the vocabulary."""
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() == 2 and prompt.shape[0] == 1:
            prompt = prompt[0]
        if prompt.dim() != 1:
            raise InputError(f"prompt_ids must be one sequence [T], got shape {tuple(prompt.shape)}")
        if prompt.is_floating_point() or prompt.dtype == torch.bool:
            raise InputError(f"prompt_ids must hold integer token ids, got dtype {prompt.dtype}")
        ids = prompt.tolist()
    elif isinstance(prompt, (str, bytes, bytearray)):
        raise TypeError(f"prompt_ids must be token ids, got {type(prompt).__name__} (encode text with the "
                         "tokenizer, or use qwen35.generate / stream_generate with a text prompt)")
    else:
        ids = []
        for t in prompt:  # ints and numpy's integers (their __index__), never a float truncated or a bool
            try:
                if isinstance(t, bool):
                    raise TypeError
                ids.append(operator.index(t))
            except TypeError:
                raise InputError(f"prompt_ids must be integer token ids, got {t!r}") from None
    if vocab_size is not None and ids and not 0 <= min(ids) <= max(ids) < vocab_size:
        bad = min(ids) if min(ids) < 0 else max(ids)
        raise InputError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    return ids


def generate_step(
    model,
    prompt_ids,
    cache: HybridCache | None = None,
    sampler: Sampler | None = None,
    params: SamplingParams | None = None,
    prefill_chunk_size: int = DEFAULT_PREFILL_CHUNK,
    guide=None,
    speculative=None,
    vision=None,
) -> Iterator[Response]:
    """Yield generated tokens one by one for a single sequence.

    prompt_ids: list of ids or LongTensor [T] (>= 1 token), fed after whatever `cache` already holds.
    sampler / params: a Sampler, or SamplingParams to build one (default SamplingParams()).
    Stops after a stop token (yielded with finish_reason "stop") or max_tokens ("length"). On return the
    cache holds the prompt and every yielded token except the last one.
    guide: a guide.GuideSpec for constrained params (stream_generate makes it from the tokenizer).
    speculative: a speculative.Speculation to draft with the MTP head (greedy: the same tokens; sampling: the
    same distribution), or None.
    vision: a multimodal.VisionPrompt whose `feed` is prompt_ids (a prompt with images: the images' features
    and 3-D positions are prefilled, then decoding goes on as for text).
    """
    if sampler is not None and params is None:
        params = sampler.params
    params = params or SamplingParams()
    ids = as_ids(prompt_ids, model.config.vocab_size)
    if not ids:
        raise ValueError("prompt_ids is empty: at least one token is needed to predict the next")
    if cache is None:
        cache = model.make_cache(batch_size=1)
    if cache.batch_size != 1:
        raise ValueError(f"generate_step runs one sequence; the cache has batch size {cache.batch_size}")
    check_context(model, cache.offset, len(ids), params.max_tokens)
    if vision is not None and vision.feed != ids:
        raise ValueError("vision.feed must be the prompt_ids being fed")
    if vision is not None and speculative is not None:
        # the MTP head's own cache has no images' 3-D positions: no drafting for an image prompt (its stats say so)
        speculative.new_row(params).turn_off("image prompt: the MTP head has no image positions",
                                             speculative.stats, "not_allowed")
        speculative = None
    if speculative is not None and params.constrained:
        speculative.new_row(params)  # drafting off for this request, and its stats say why
        speculative = None
    if speculative is not None:
        from . import speculative as spec

        yield from spec.generate(model, ids, cache, params, speculative, prefill_chunk_size, sampler)
        return
    if sampler is not None:
        stream = Stream(params, sampler, None if guide is None else guide.start(ids))
    else:
        stream = Stream.start(model, ids, params, guide=guide)
    # the KV room for the prompt and the first tokens now: grown once, not doubled chunk by chunk through a
    # long prefill (each growth copies every token held so far). Not all of max_tokens: a stop token ends most
    # answers long before it, and decoding grows the rest as it gets there
    cache.reserve(len(ids) + min(params.max_tokens, RESERVE_DECODE_TOKENS))
    if vision is not None:
        logits = vision.prefill(model, cache, prefill_chunk_size)
    else:
        logits = prefill(model, torch.tensor([ids], device=model.device), cache, prefill_chunk_size)
    with torch.no_grad():
        r = stream.sample(logits)
    yield r
    left = params.max_tokens - 1  # tokens still to feed at most (the last one sampled is never fed)
    while r.finish_reason is None:
        decode_room(cache, left)
        with torch.no_grad():
            (r,) = step(model, cache, [stream])[0]
        left -= 1
        yield r


def decode_room(cache: HybridCache, left: int) -> None:
    """Before a decode step: a row whose KV is full grows as doubling would, never past what its answer can
    still use (left: the most tokens any row will still feed). Doubling alone took a 3000-token prompt with
    max_tokens 1100 to 8192 slots."""
    if cache.room < 1:
        cache.reserve(min(left, max(max(cache.lengths), RESERVE_DECODE_TOKENS)), exact=True)


def batch_generate(
    model,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | None = None,
    prefill_chunk_size: int = DEFAULT_PREFILL_CHUNK,
    speculative=None,
) -> list[list[Response]]:
    """Generate for several prompts at once: each is prefilled alone (no padding anywhere), then all
    decode in one batch, rows leaving as they finish. Each row has its own sampler (same seed), so every
    row's output equals running its prompt alone. Returns one list of Response per prompt, each ending
    with its finish_reason. speculative: a speculative.Speculation (rows then accept different numbers of
    drafts per round)."""
    params = params or SamplingParams()
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("batch_generate needs at least one prompt, each with >= 1 token")
    for p in prompts:
        check_context(model, 0, len(p), params.max_tokens)
    if speculative is not None:
        speculative.head(model)  # no MTP head: fail before any work
    outputs: list[list[Response]] = [[] for _ in prompts]
    caches, mcaches, streams, drafting, rows = [], [], [], [], []
    for b, p in enumerate(prompts):
        cache = model.make_cache(batch_size=1)
        stream = Stream.start(model, p, params)
        if speculative is None:
            cache.reserve(len(p) + min(params.max_tokens, RESERVE_DECODE_TOKENS))  # (as generate_step does)
            logits = prefill(model, torch.tensor([p], device=model.device), cache, prefill_chunk_size)
        else:
            from . import speculative as spec

            mcache, row = model.make_mtp_cache(batch_size=1), speculative.new_row(params)
            logits, last_h = spec.prefill(model, p, cache, mcache, prefill_chunk_size)
        with torch.no_grad():
            outputs[b].append(stream.sample(logits))
        if speculative is not None:
            spec.start(row, outputs[b][-1], last_h)
            mcaches.append(mcache)
            drafting.append(row)
        if stream.finish is None:
            caches.append(cache)
            streams.append(stream)
            rows.append(b)
    if not streams:
        return outputs
    cache = HybridCache.merge(caches)
    if speculative is not None:
        drafting = [drafting[b] for b in rows]
        mcache = HybridCache.merge([mcaches[b] for b in rows])
    while streams:
        with torch.no_grad():
            if speculative is None:
                decode_room(cache, params.max_tokens - min(len(outputs[b]) for b in rows))
                produced = step(model, cache, streams)
            else:
                produced = spec.step(model, cache, mcache, streams, drafting, speculative)
        keep = []
        for i, rs in enumerate(produced):
            outputs[rows[i]].extend(rs)
            if streams[i].finish is None:
                keep.append(i)
        if len(keep) < len(streams):
            cache.filter(keep)
            streams, rows = [streams[i] for i in keep], [rows[i] for i in keep]
            if speculative is not None:
                mcache.filter(keep)
                drafting = [drafting[i] for i in keep]
    return outputs
