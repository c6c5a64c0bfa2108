"""A request's prompt fed to its own one-row cache a chunk at a time, between the batch's decode steps.

Scheduling policy (engine.py): each turn of the engine's loop runs one decode step for the running batch,
then one prefill chunk (`prefill_chunk_size` tokens) of one waiting prompt, taking the prompts in turn
(round robin). So a long prompt never holds the batch for longer than one chunk per token, a short prompt
that arrives during a long one's prefill gets its first token after a chunk or two of the long one (not
after all of it), and a request whose client went away stops within one chunk.

The row's KV is reserved for prompt + max_tokens (+ draft slack) before the first chunk, which is what the
engine's memory budget counts: the KV never grows (or copies) afterwards.
"""

from __future__ import annotations

import torch

from .. import speculative, threads

DRAFT_SLACK = 16  # positions past max_tokens a speculative verify may write before the row ends


class PromptFeed:
    def __init__(self, model, req, prompt_cache, chunk_size: int, speculation=None):
        if chunk_size < 1:
            raise ValueError(f"prefill chunk size must be >= 1, got {chunk_size}")
        self.model, self.req, self.prompt_cache, self.chunk_size = model, req, prompt_cache, chunk_size
        self.key = req.key or req.prompt  # what prompt reuse matches: an image's pads stand for its pixel hash
        self.logits: torch.Tensor | None = None  # fp32 [1, vocab] of the prompt's last token, once fed
        self.last_hidden: torch.Tensor | None = None
        # the same prompt served before: its end restored with its logits, nothing to feed (not with images,
        # whose positions are set up by the feed, nor with drafting, which needs the MTP head's state too)
        exact = prompt_cache.lookup_exact(self.key) if req.images is None and speculation is None else None
        if exact is not None:
            self.cache, self.logits = exact
            self.cached = len(self.key)
        else:
            self.cache, self.cached = prompt_cache.lookup(self.key)
        self.pos = self.cache.offset
        self.vision = None  # multimodal.VisionPrompt of a prompt with images (the app refuses them with drafting)
        if req.images is not None:
            from ..multimodal import VisionPrompt

            self.vision = VisionPrompt.build(model, req.prompt, req.images, self.pos)
        T = len(req.prompt)
        # snapshot points inside the uncached part: the end of a long opening system turn (another
        # conversation with that system prompt and tools reuses it), a turn boundary (the next turn reuses up
        # to it), the end
        self.stops = sorted({b for b in (req.prefix, req.boundary) if self.pos < b < T}) + [T]
        self.ids = torch.tensor([req.prompt], device=model.device)
        room = T - self.pos + req.params.max_tokens + (DRAFT_SLACK if speculation is not None else 0)
        self.cache.reserve(room, exact=True)
        self.mcache = None
        if speculation is not None:
            self.mcache = model.make_mtp_cache(batch_size=1)
            self.mcache.reserve(room, exact=True)
            speculative.prefill_start(self.cache, self.mcache)

    @property
    def done(self) -> bool:
        return self.logits is not None

    def feed(self) -> None:
        """Feed the next chunk (up to the next snapshot point); after the last one, `logits` is set."""
        T, s = len(self.req.prompt), self.pos
        e = min(s + self.chunk_size, next(b for b in self.stops if b > s))
        last = e == T
        with torch.no_grad():
            if self.vision is not None:
                base = len(self.req.prompt) - len(self.vision.feed)
                if s == base:  # the first chunk: positions, and the images encoded once
                    self.vision.prepare(self.model, self.cache)
                self.logits = self.vision.feed_chunk(self.model, self.cache, s - base, e - base)
            elif self.mcache is not None:
                h = threads.run("prefill", lambda: speculative.prefill_chunk(
                    self.model, self.ids, s, e, self.cache, self.mcache), e - s)
                if last:
                    self.logits, self.last_hidden = self.model.logits(h[:, -1:])[:, -1], h[0, -1]
            elif last:
                self.logits = threads.run("prefill", lambda: self.model(
                    self.ids[:, s:e], cache=self.cache, logits_to_keep=1)[:, -1], e - s)
            else:
                threads.run("prefill", lambda: self.model.hidden_states(self.ids[:, s:e], cache=self.cache), e - s)
        self.pos = e
        if e in self.stops:  # a turn boundary or the prompt's end: later requests restore from here
            plain = self.vision is None and self.mcache is None  # (what lookup_exact serves)
            self.prompt_cache.store(self.key[:e], self.cache, self.logits if last and plain else None)
