"""Chat templates: the checkpoint's own Jinja template, rendered exactly as transformers renders it.

Source, in order: a GGUF's `tokenizer.chat_template`, `chat_template.jinja` next to the weights, `chat_template` in tokenizer_config.json (a
string, or a list of named templates: "default"), else qwen35's default template
(qwen35/templates/qwen3_5.jinja), written to the documented Qwen3.5 format.

Rendering uses a sandboxed Jinja environment configured like transformers' (trim_blocks, lstrip_blocks,
loop controls, a `tojson` that keeps non-ASCII and HTML characters), so output is byte-identical.
Before rendering, messages are made forgiving the way agent frameworks need: tool-call `arguments` given as
a JSON string become an object, and reasoning given as `reasoning`/`thinking` is also `reasoning_content`.

`render_segments` is the prompt for a tokenizer that must tell the template's own structure from what a
client wrote: text from system, user and tool messages and tool definitions (names as well as values) that
spells a control token (`<|im_start|>`, `<think>`, ...) comes back as a piece of its own, to be encoded as
plain text. Assistant turns (content, reasoning, tool calls) were written by the model, but sent back by a
client, who may have edited them or had the model copy an attacker's text: there only the model's own markup
(`<think>`, `<tool_call>`: MODEL_MARKUP) stays control tokens, so a cached answer is reused token for token,
and a typed `<|im_end|>` is still text.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import uuid
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import Qwen35Error

log = logging.getLogger("qwen35")

DEFAULT_TEMPLATE_FILE = Path(__file__).parent / "templates" / "qwen3_5.jinja"
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
TOOL_RESPONSE = ("<tool_response>", "</tool_response>")
# the control tokens a model writes in its own answers (reasoning, tool calls); every other one in an assistant
# turn (<|im_end|>, <|im_start|>, vision pads, ...) is text a client typed or the model copied
MODEL_MARKUP = ("<think>", "</think>", "<tool_call>", "</tool_call>")
# what render and render_segments take themselves (self: jinja's own render): not a template variable's name
RENDER_ARGUMENTS = frozenset(("self", "messages", "literals", "tools", "add_generation_prompt", "enable_thinking"))


class ChatTemplateError(Qwen35Error):
    """The chat template is missing, invalid, or refused the conversation. `reason` is the message without
    where the template came from (a server's file paths are no business of its clients)."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


def find_template(model_dir: str | Path | None) -> tuple[str, str]:
    """(template source, where it came from)."""
    from .gguf.reader import is_gguf_path
    if model_dir is not None and is_gguf_path(model_dir) and Path(model_dir).is_file():
        from .gguf import open_gguf
        from .gguf.vocab import chat_template

        tmpl = chat_template(open_gguf(model_dir))
        if tmpl is not None:
            return tmpl, f"{model_dir} (tokenizer.chat_template)"
    elif model_dir is not None:
        d = Path(model_dir)
        if (d / "chat_template.jinja").is_file():
            return (d / "chat_template.jinja").read_text(encoding="utf-8"), str(d / "chat_template.jinja")
        cfg = d / "tokenizer_config.json"
        if cfg.is_file():
            try:
                tmpl = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
            except json.JSONDecodeError as e:
                raise ChatTemplateError(f"{cfg}: not valid JSON ({e})") from None
            if isinstance(tmpl, list):
                named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
                tmpl = named.get("default") or next(iter(named.values()), None)
            if isinstance(tmpl, str) and tmpl.strip():
                return tmpl, f"{cfg} (chat_template)"
    return DEFAULT_TEMPLATE_FILE.read_text(encoding="utf-8"), "qwen35 default (Qwen3.5 format)"


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


@lru_cache(maxsize=8)
class _Generation(Extension):
    """transformers' `{% generation %}...{% endgeneration %}` block, which marks assistant text for
    assistant-only training masks (TRL fine-tunes ship templates with it): for rendering a prompt it is its
    body, as transformers renders it outside return_assistant_tokens_mask."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _Generation])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile: {e.message} (line {e.lineno})") from None


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A forgiving copy: JSON-string tool arguments become objects; reasoning aliases are filled in."""
    if not isinstance(messages, list):
        raise ChatTemplateError(f"messages must be a list of objects, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ChatTemplateError(f"messages[{i}] must be an object with a 'role'")
        m = copy.deepcopy(m)
        reasoning = next((m[k] for k in REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m["reasoning_content"] = reasoning
        for j, call in enumerate(m.get("tool_calls") or []):
            fn = call.get("function", call) if isinstance(call, dict) else None
            if not isinstance(fn, dict):
                raise ChatTemplateError(f"messages[{i}].tool_calls[{j}] must be an object")
            args = fn.get("arguments")
            if isinstance(args, str):
                try:
                    parsed = json.loads(args) if args.strip() else {}
                except json.JSONDecodeError:
                    raise ChatTemplateError(f"messages[{i}].tool_calls[{j}].function.arguments is not valid JSON: "
                                            f"{args[:80]!r}") from None
                if not isinstance(parsed, dict):
                    raise ChatTemplateError(f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON object")
                fn["arguments"] = parsed
        out.append(m)
    return out


class ChatTemplate:
    def __init__(self, source: str, origin: str = "template"):
        self.source, self.origin = source, origin
        self._template = _compile(source)

    def uses(self, variable: str) -> bool:
        """Whether the template reads `variable` (e.g. preserve_thinking), so passing it has an effect."""
        return variable in jinja2.meta.find_undeclared_variables(self._template.environment.parse(self.source))

    @classmethod
    def from_model_dir(cls, model_dir: str | Path | None) -> ChatTemplate:
        return cls(*find_template(model_dir))

    def render(self, messages: list[dict[str, Any]], /, tools: list[dict] | None = None,
               add_generation_prompt: bool = True, enable_thinking: bool | None = None, **kwargs) -> str:
        """The prompt text for `messages` (and `tools`), ending with the assistant's opening when
        add_generation_prompt. enable_thinking None leaves the template's own default. kwargs: the template's
        other variables, none named as one of RENDER_ARGUMENTS."""
        clash = sorted(RENDER_ARGUMENTS & kwargs.keys())
        if clash:
            raise ChatTemplateError(f"'{clash[0]}' is an argument of the chat template's render, not a variable to "
                                    "set beside it")
        variables = dict(kwargs)
        if enable_thinking is not None:
            variables["enable_thinking"] = enable_thinking
        messages = normalize_messages(messages)
        try:
            return self._template.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                         **variables)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template ({self.origin}) refused the conversation: {e}", str(e)) from None
        except RecursionError:
            raise ChatTemplateError(f"chat template ({self.origin}) recursed too deeply", "recursed too deeply") from None
        except Exception as e:  # noqa: BLE001 - a template's own bug (e.g. 1 + 'a') is a refusal, not a crash
            reason = f"{type(e).__name__}: {e}"
            raise ChatTemplateError(f"chat template ({self.origin}) failed: {reason}", reason) from None

    def render_segments(self, messages: list[dict[str, Any]], literals: list[str], /, tools: list[dict] | None = None,
                        **kwargs) -> list[tuple[str, bool]]:
        """`render`, as [(text, is_template)] pieces: every spelling of one of `literals` (the tokenizer's
        control tokens) inside system/user/tool content or the tool definitions, or of one but MODEL_MARKUP
        inside an assistant turn, is a piece of its own with is_template False. With none there, one piece:
        exactly `render`'s text."""
        messages = normalize_messages(messages)  # JSON-string arguments parsed first: an escape hides no spelling
        mark, found = f"\ue000{uuid.uuid4().hex}", []

        def hider(hidden: list[str]):  # each of `hidden` -> a marker the template passes through unchanged
            pattern = _spellings(hidden)

            def one(m):
                found.append(m.group())
                return f"{mark}{len(found) - 1}\ue001"
            return lambda text: pattern.sub(one, text)

        hide, hide_in_answer = hider(literals), hider([t for t in literals if t not in MODEL_MARKUP])
        hidden = [_map_strings(m, hide_in_answer) if m["role"] == "assistant"
                  else _map_outer_kept(m, hide) if m["role"] == "user" and _tool_results(m) else _map_content(m, hide)
                  for m in messages]
        text = self.render(hidden, tools=_map_strings(tools, hide) if tools else tools, **kwargs)
        if not found:
            return [(text, True)]
        pieces = re.split(re.escape(mark) + r"(\d+)\ue001", text)
        out = [(pieces[0], True)]
        for i in range(1, len(pieces), 2):
            out += [(found[int(pieces[i])], False), (pieces[i + 1], True)]
        out = [(t, special) for t, special in out if t]
        # a template whose output depends on the hidden text (a condition on it) saw markers instead: the
        # prompt would differ from render's. Said, never silent; the pieces stay hidden (a client's text is
        # never read as control tokens)
        if "".join(t for t, _ in out) != self.render(messages, tools=tools, **kwargs):
            log.warning("chat template (%s): the prompt with the client's control-token spellings kept as text "
                        "differs from the template's own rendering", self.origin)
        return out


def _spellings(literals: list[str]) -> re.Pattern:
    """Each of `literals`, longest first; and one less its last character at the end of a string, which the
    template's next character may complete (`<parameter=` + name + `>`). Matches nothing if none."""
    whole = sorted((t for t in literals if t), key=len, reverse=True)
    cut = [re.escape(t[:-1]) + r"\Z" for t in whole if len(t) > 1]
    return re.compile("|".join([re.escape(t) for t in whole] + cut) or "(?!)")


def _map_strings(value: Any, fn) -> Any:
    """`fn` applied to every string in `value`, the keys of objects included (a tool's property names)."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    if isinstance(value, dict):
        return {_map_strings(k, fn): _map_strings(v, fn) for k, v in value.items()}
    return value


def _content_text(content: Any) -> str:
    """A message's content as a template's render_content joins it (a non-text part as a character no text
    starts or ends with)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] if isinstance(p, dict) and isinstance(p.get("text"), str) else "\0" for p in content)
    return ""


def _tool_results(message: dict) -> bool:
    """A user message holding tool results the Qwen way, `<tool_response>...</tool_response>` (how clients
    that render tool turns themselves send them): the official template tests for exactly this, and treats
    the message as tool output rather than a new query (the current turn's reasoning stays)."""
    text = _content_text(message.get("content")).strip()
    return text.startswith(TOOL_RESPONSE[0]) and text.endswith(TOOL_RESPONSE[1])


def _map_outer_kept(message: dict, fn) -> dict:
    """_map_content for a `_tool_results` message: the opening and closing tags stay as they are, the tokens
    the template writes for tool messages, so the template's test sees them; `fn` maps all between."""
    content = message["content"]
    if isinstance(content, str):
        return {**message, "content": _outer_kept(content, fn, True, True)}
    texts = [i for i, p in enumerate(content) if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return {**message, "content": [
        {**p, "text": _outer_kept(p["text"], fn, i == texts[0], i == texts[-1])} if i in texts else p
        for i, p in enumerate(content)]}


def _outer_kept(text: str, fn, head: bool, tail: bool) -> str:
    start = len(text) - len(text.lstrip()) + len(TOOL_RESPONSE[0]) if head else 0
    end = len(text.rstrip()) - len(TOOL_RESPONSE[1]) if tail else len(text)
    if end < start:  # (one part that is all tags)
        return text
    return text[:start] + fn(text[start:end]) + text[end:]


def _map_content(message: dict, fn) -> dict:
    """A copy of a client-written message with `fn` applied to its text (content, text parts)."""
    m = dict(message)
    content = m.get("content")
    if isinstance(content, str):
        m["content"] = fn(content)
    elif isinstance(content, list):
        m["content"] = [{**p, "text": fn(p["text"])} if isinstance(p, dict) and isinstance(p.get("text"), str) else p
                        for p in content]
    return m
