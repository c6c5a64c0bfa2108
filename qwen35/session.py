"""A multi-turn chat that never re-prefills earlier turns.

Each turn renders the whole conversation with the chat template, then restores the longest snapshotted
prefix and prefills only the rest. Snapshots are taken at the end of each user turn, of each prompt and of
each answer. Past answers keep their think block as generated (`preserve_thinking`, on by default), so the
next rendering agrees with the answer's snapshot and a turn prefills only its new message; with it off (or
a template that ignores it) past reasoning is dropped and reuse stops at the previous user turn. The
model's output is parsed as it streams into reasoning, content and tool calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

from .generation import check_context, generate_step, prefill
from .guide import make_guide
from .prompt_cache import PromptCache
from .sampling import SamplingParams, preset
from .toolcalls import OutputParser, ParsedDelta, ToolCall


@dataclass
class TurnStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # restored from a snapshot
    prefilled_tokens: int = 0  # actually run through the model for this prompt
    generated_tokens: int = 0
    finish_reason: str | None = None
    reasoning_cut: str | None = None  # "budget" or "loop" when </think> was inserted (guide.py)


@dataclass
class Event:
    kind: str  # "reasoning", "content", "tool_call", "error"
    text: str = ""
    call: ToolCall | None = None


class ChatSession:
    def __init__(self, model, tokenizer, system: str | None = None, tools: list[dict] | None = None,
                 enable_thinking: bool | None = None, params: SamplingParams | None = None,
                 max_cache_bytes: int = 2 * 2**30, preserve_thinking: bool = True, speculation=None):
        self.model, self.tokenizer = model, tokenizer
        self.template = tokenizer.chat_template
        self.system, self.tools = system, tools
        self.enable_thinking = enable_thinking
        # past answers keep their think block as generated, so the next turn reuses them (see server/app.py)
        self.preserve_thinking = preserve_thinking
        self.params = params
        self.speculation = speculation  # a speculative.Speculation: each turn drafts with the MTP head
        self.prompt_cache = PromptCache(model, max_cache_bytes)
        self.messages: list[dict] = []
        self.last = TurnStats()
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.images: list = []  # every picture of the conversation, prepared (multimodal.VisionInput), in order
        self.prompt_cache.clear()

    def _render(self, generation: bool) -> tuple[str, list[int]]:
        """The conversation's text and ids. Typed text is encoded as text (render_segments), as the server does:
        a "<|im_end|><|im_start|>system" pasted into a turn (or spelled by an answer) had become a new turn."""
        pieces = self.template.render_segments(
            self.messages, self.tokenizer.added_tokens, tools=self.tools, add_generation_prompt=generation,
            enable_thinking=self.enable_thinking, preserve_thinking=self.preserve_thinking)
        return "".join(text for text, _ in pieces), self.tokenizer.encode_segments(pieces)

    def send(self, user_text: str, max_tokens: int | None = None, images=None) -> Iterator[Event]:
        """Add a user turn and stream the answer as events; the answer joins the history at the end (or
        where the caller stops iterating, e.g. on Ctrl-C). images: pictures for this turn (paths, PIL images,
        bytes or data: URLs), placed before its text."""
        if not isinstance(user_text, str):  # before the turn joins the history
            raise TypeError(f"user_text must be a string, got {type(user_text).__name__}")
        content = user_text
        n_messages, n_images = len(self.messages), len(self.images)
        if images:
            from .multimodal import prepare_images

            new = prepare_images(self.model, images)  # a bad picture fails before the turn joins the history
            content = [*({"type": "image"} for _ in new), {"type": "text", "text": user_text}]
            self.images += new
        self.messages.append({"role": "user", "content": content})
        try:  # a turn refused before any work (too long, bad text, bad guide) leaves the history as it was
            prompt, ids = self._render(True)
            boundary = self._render(False)[1]
            if ids[: len(boundary)] != boundary:
                boundary = []  # tokenisation merged across the boundary: skip that snapshot
            key = vision = None
            if not self.images:
                from .multimodal import check_no_placeholders

                check_no_placeholders(self.model, ids)
            else:  # pads expanded; prompt reuse keyed on the pictures' content
                from .multimodal import VisionPrompt, expand_prompt, prepare_prompt

                ids, inputs, key = prepare_prompt(self.model, ids, self.images)
                if boundary:
                    boundary = key[: len(expand_prompt(boundary, inputs, self.model.visual.config.image_token_id))]
            thinking = prompt.rstrip().endswith("<think>")
            params = (self.params or preset(thinking)).with_stops(self.tokenizer.eos_token_ids)
            if max_tokens is not None:
                params = replace(params, max_tokens=max_tokens)
            check_context(self.model, 0, len(ids), params.max_tokens)
            guide = make_guide(params, self.tokenizer, self.model.config.vocab_size)
        except BaseException:
            del self.messages[n_messages:]
            del self.images[n_images:]
            raise
        try:  # the history up to this turn, prefilled: stopped here (Ctrl-C in a long paste), the turn is undone
            cache, cached = self.prompt_cache.lookup(key or ids)
            if boundary and cached < len(boundary):
                if key is None:
                    prefill(self.model, _tensor(boundary[cached:]), cache)
                else:
                    VisionPrompt.build(self.model, ids[: len(boundary)], inputs, cached).prefill(self.model, cache,
                                                                                                  512)
                self.prompt_cache.store(boundary, cache)
                done = len(boundary)
            else:
                done = cached
            if key is not None:
                vision = VisionPrompt.build(self.model, ids, inputs, done)
        except BaseException:
            del self.messages[n_messages:]
            del self.images[n_images:]
            raise
        self.last = TurnStats(prompt_tokens=len(ids), cached_tokens=cached, prefilled_tokens=len(ids) - cached)
        # no tools, no calls: a reply that shows the call format (a tutorial, a quote) stays text, as the
        # server does for a request without tools
        parser = OutputParser(self.tools, thinking_open=thinking, tool_calls=self.tools is not None)
        text_stream = self.tokenizer.text_stream()
        answer = ParsedDelta()
        stored = False
        generated: list[int] = []
        try:
            for step in generate_step(self.model, ids[done:], cache=cache, params=params, guide=guide,
                                      speculative=self.speculation, vision=vision):
                if not stored:
                    self.prompt_cache.store(key or ids, cache)
                    stored = True
                generated.append(step.token)
                self.last.generated_tokens += 1
                self.last.finish_reason = step.finish_reason
                self.last.reasoning_cut = self.last.reasoning_cut or step.reasoning_cut
                delta = parser.feed(text_stream.add(step.token, step.finish_reason))
                if step.finish_reason:
                    delta += parser.finish()
                answer += delta
                yield from _events(delta)
        finally:
            # the answer's end (its last token was sampled, never fed): where the next turn diverges
            answered = (key or ids) + generated[:-1]
            # (one token: the prompt is stored; a forward stopped part-way left no exact state to keep)
            if len(generated) > 1 and cache.interrupted is None and cache.offset == len(answered):
                self.prompt_cache.store(answered, cache)
            if self.last.finish_reason is None:  # stopped early (Ctrl-C, error): flush the parser
                tail = parser.finish()
                answer += tail
            msg = {"role": "assistant", "content": answer.content}
            if answer.reasoning:
                msg["reasoning_content"] = answer.reasoning
            if answer.tool_calls:
                msg["tool_calls"] = [{"type": "function", "id": c.id, "function": {"name": c.name,
                                                                                   "arguments": c.arguments}}
                                     for c in answer.tool_calls]
            self.messages.append(msg)


def _events(delta: ParsedDelta) -> Iterator[Event]:
    if delta.reasoning:
        yield Event("reasoning", delta.reasoning)
    if delta.content:
        yield Event("content", delta.content)
    for call in delta.tool_calls:
        yield Event("tool_call", call=call)
    for err in delta.errors:
        yield Event("error", err)


def _tensor(ids: list[int]):
    import torch

    return torch.tensor([ids])
