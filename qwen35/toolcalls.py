"""Parsing model output as it streams: reasoning, content and tool calls.

A state machine over text (not tokens), fed any split of the stream; the concatenated results never depend
on where the splits fall, because a possible partial tag at the end of a piece is held back until the
next piece decides it.

(One state machine, kept whole: its tag states cut across reasoning, content and tool calls, which is why
the file runs past ~300 lines.)

- `<think>...</think>` is reasoning, including when the prompt already opened `<think>` (pass
  thinking_open=True) and when `</think>` never comes (then everything is reasoning).
- `<tool_call>...</tool_call>` holds either the XML form Qwen3.5 is trained on
  (`<function=NAME><parameter=ARG>value</parameter>...</function>`, any parameter order, multi-line values,
  one or more functions) or the JSON form `{"name": ..., "arguments": {...}}`. Calls are recognised in content
  and inside `<think>` alike. Values are coerced by the tool's JSON schema when it is known (tool_schema.py).
- A call is given out only once it is complete and parsed, whole (a stream announces no call that the whole
  answer lacks). A `<tool_call>` that is never closed, or that `</think>` or another `<tool_call>` follows
  before it closes, was prose (or cut off): its text goes back to the reasoning or content it was written in.
- Malformed calls (unclosed tags, unknown function, bad JSON) never raise: their raw text is kept as
  content and the problem is reported in `errors`.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from .tool_schema import coerce, loads_json, tool_schemas

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
FUNC_OPEN, FUNC_CLOSE = "<function=", "</function>"  # a bare call (no <tool_call> around it), when tools were offered
PARAM_CLOSE = "</parameter>"


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def arguments_json(self) -> str:
        # NaN and Infinity are not JSON (a JavaScript client cannot parse them); coercion never makes them
        return json.dumps(self.arguments, ensure_ascii=False, allow_nan=False)


@dataclass
class ParsedDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)  # complete calls
    errors: list[str] = field(default_factory=list)

    def __iadd__(self, other: ParsedDelta) -> ParsedDelta:
        self.reasoning += other.reasoning
        self.content += other.content
        self.tool_calls += other.tool_calls
        self.errors += other.errors
        return self


_FUNC_OPEN = re.compile(r"<function=([^>\n]+)>")
_TAG = re.compile(r"<parameter=([^>\n]+)>|</function>")
# Where a value ends. Code and prose in a value may hold "</parameter>", "</function>" or "<parameter=x>", so
# the end is the first of: a </parameter> that the next parameter follows, or </function> and then nothing but
# the next function; or, </parameter> missing, a tag that begins a line (the format puts each tag on its own
# line). Failing those, a </parameter> that any tag follows; failing that, the next tag wherever it is.
_STRICT_END = re.compile(r"</parameter>\s*(?=<parameter=[^>\n]+>|</function>\s*(?:<function=|\Z))")
_LINE_TAG = re.compile(r"(?<=\n)(?:<parameter=[^>\n]+>|</function>)")
_LOOSE_END = re.compile(r"</parameter>\s*(?=<parameter=[^>\n]+>|</function>|\Z)")


def _value_end(text: str, i: int) -> tuple[int, int, bool]:
    """The value that starts at text[i]: (where it ends, where the text after its closing tag resumes, whether
    its end is certain; a guess from the last rule, or the end of the text, is not)."""
    strict, line = _STRICT_END.search(text, i), _LINE_TAG.search(text, i)
    if line is not None and (strict is None or line.start() < strict.start()):
        head = text[i:line.start()].rstrip()
        if head.endswith(PARAM_CLOSE):  # "</parameter>\n</function>" with only junk after the function
            return i + len(head) - len(PARAM_CLOSE), line.start(), True
        return line.start(), line.start(), True
    m = strict or _LOOSE_END.search(text, i)
    if m is not None:
        return m.start(), m.end(), True
    m = _TAG.search(text, i)
    return (m.start(), m.start(), False) if m else (len(text), len(text), False)


def _param_value(raw: str, schema: dict | None, params: dict) -> Any:
    # the format puts the value on its own lines: drop exactly one newline on each side (with </parameter>
    # missing, the newline before the next tag too)
    raw = raw[1:] if raw.startswith("\n") else raw
    raw = raw[:-1] if raw.endswith("\n") else raw
    return coerce(raw, schema, params)


def _xml_function(text: str, i: int, params: dict) -> tuple[dict[str, Any], int, bool]:
    """The arguments of the function whose body starts at text[i] (after `<function=NAME>`), in order; a name
    given twice keeps its first value. params: the function's parameters schema ({} when unknown). Returns
    (arguments, where its body ends, whether </function> closed it and every value's end was certain)."""
    props = params.get("properties") if isinstance(params, dict) else None
    props = props if isinstance(props, dict) else {}
    args: dict[str, Any] = {}
    certain = True
    while (m := _TAG.search(text, i)) is not None:
        if m.group(1) is None:  # </function>
            return args, m.end(), certain
        end, i, sure = _value_end(text, m.end())
        certain = certain and sure
        key = m.group(1).strip()
        if key not in args:
            args[key] = _param_value(text[m.end():end], props.get(key), params)
    return args, len(text), False


def parse_call_body(body: str, schemas: dict[str, dict] | None) -> tuple[list[ToolCall], str | None, bool]:
    """One `<tool_call>` body (or a bare `<function=...>` block) -> (calls, None, complete) or ([], reason,
    complete). complete: the body ends where its last call does (JSON: an object; XML: every function closed
    with </function>, no value's end a guess), so a call missing its closing </tool_call> can still be taken."""
    text = body.strip()
    if text.startswith("{"):
        try:
            obj = loads_json(text)
        except (ValueError, RecursionError) as e:
            return [], f"tool call is not valid JSON ({getattr(e, 'msg', e)})", True
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return [], "JSON tool call needs a string 'name'", True
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = loads_json(args) if args.strip() else {}
            except (ValueError, RecursionError):
                return [], f"arguments of tool call '{obj['name']}' are not valid JSON", True
        if not isinstance(args, dict):
            return [], f"arguments of tool call '{obj['name']}' must be an object", True
        found, complete = [(obj["name"], args)], True
    else:
        found, i, complete = [], 0, True
        while (m := _FUNC_OPEN.search(text, i)) is not None:  # one <tool_call> may hold several functions
            name = m.group(1).strip()
            args, i, closed = _xml_function(text, m.end(), (schemas or {}).get(name, {}))
            found.append((name, args))
            complete = complete and closed
        if not found:
            return [], "tool call has no <function=NAME> block", False
    for name, _ in found:
        if schemas is not None and name not in schemas:
            return [], f"model called unknown function '{name}'", complete
    return [ToolCall(name, args) for name, args in found], None, complete


class OutputParser:
    """Feed text pieces; each `feed` returns what became certain. Call `finish` at the end."""

    def __init__(self, tools: list[dict] | None = None, thinking_open: bool = False, tool_calls: bool = True):
        """tool_calls False: the text is content and reasoning only, `<tool_call>` included (a server request
        that offered no tools, or tool_choice "none", gets no calls back)."""
        self.schemas = tool_schemas(tools)
        self.tool_calls = tool_calls
        self.mode = "reasoning" if thinking_open else "content"
        self.buf = ""
        self.call_text = ""  # inside <tool_call>, raw
        self.call_return = "content"  # mode to go back to after the call
        self.pending_ws = ""  # trailing whitespace held back (dropped before a tag)
        self.at_start = True  # strip leading whitespace at the start of a segment
        self.bare = False  # the call in progress is a <function=...> block without <tool_call>

    def _tags(self) -> tuple[str, ...]:
        if self.mode == "call":
            # a <tool_call> before this one closes, or the end of the reasoning it was opened in, shows that
            # this one was prose (or was cut off)
            ends = (CALL_OPEN,) + ((THINK_CLOSE,) if self.call_return == "reasoning" else ())
            return ((FUNC_CLOSE,) if self.bare else (CALL_CLOSE,)) + ends
        calls = ((CALL_OPEN,) + ((FUNC_OPEN,) if self.schemas is not None else ())) if self.tool_calls else ()
        if self.mode == "reasoning":
            return (THINK_CLOSE,) + calls
        return (THINK_OPEN,) + calls

    def _emit(self, out: ParsedDelta, text: str, final: bool = False) -> None:
        if self.at_start:
            text = text.lstrip()
            if not text:
                return
            self.at_start = False
        text = self.pending_ws + text
        self.pending_ws = ""
        if not final:
            body = text.rstrip()
            self.pending_ws = text[len(body):]
            text = body
        if self.mode == "reasoning":
            out.reasoning += text
        else:
            out.content += text

    def _switch(self, mode: str) -> None:
        self.mode, self.pending_ws, self.at_start = mode, "", True

    def feed(self, text: str) -> ParsedDelta:
        out = ParsedDelta()
        self.buf += text
        while self.buf:
            tags = self._tags()
            hits = [(self.buf.find(t), t) for t in tags]
            hits = [(i, t) for i, t in hits if i >= 0]
            if hits:
                i, tag = min(hits)
                before, self.buf = self.buf[:i], self.buf[i + len(tag):]
                if self.mode == "call":
                    self.call_text += before
                    if tag == CALL_CLOSE:
                        self._close_call(out)
                    elif tag == FUNC_CLOSE:
                        self.call_text += FUNC_CLOSE
                        if parse_call_body(self.call_text, self.schemas)[2]:
                            self._close_call(out)
                        # else the "</function>" sits inside a value (code that prints it): read on
                    else:  # read the tag again as text of the phase the call was opened in
                        self.buf = tag + self.buf
                        self._unclosed(out, f" before {tag}")
                    continue
                self._emit(out, before)
                if tag in (CALL_OPEN, FUNC_OPEN):
                    self.call_return, self.mode = self.mode, "call"
                    self.bare = tag == FUNC_OPEN
                    self.call_text = FUNC_OPEN if self.bare else ""
                elif tag == THINK_OPEN:
                    self._switch("reasoning")
                else:  # THINK_CLOSE
                    self._switch("content")
                continue
            # no complete tag: keep back a suffix that could still become one
            keep = max((k for t in tags for k in range(1, len(t)) if self.buf.endswith(t[:k])), default=0)
            ready, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep:]
            if self.mode == "call":
                self.call_text += ready
            else:
                self._emit(out, ready)
            break
        return out

    def _raw_call(self) -> str:
        """The text of the call in progress as the model wrote it (its closing tag not included)."""
        return self.call_text if self.bare else CALL_OPEN + self.call_text

    def _close_call(self, out: ParsedDelta) -> None:
        calls, err, _ = parse_call_body(self.call_text, self.schemas)
        self.mode = self.call_return
        if err is None:
            out.tool_calls += calls
            self.pending_ws = ""
        else:
            out.errors.append(err)
            self._emit(out, self._raw_call() + ("" if self.bare else CALL_CLOSE))
        self.call_text, self.bare = "", False

    def _unclosed(self, out: ParsedDelta, why: str, final: bool = False) -> None:
        """The call in progress ended without its closing tag (`why`: what ended it; "" for the end of the
        text). Complete calls are taken, with a note; anything else is text of the phase it was written in."""
        calls, err, complete = parse_call_body(self.call_text, self.schemas)
        close = FUNC_CLOSE if self.bare else CALL_CLOSE
        self.mode = self.call_return
        if err is None and complete:
            out.tool_calls += calls
            out.errors.append(f"tool call was not closed with {close}{why}; parsed anyway")
            self.pending_ws = ""
        else:
            out.errors.append(err if complete else f"tool call was not closed with {close}{why}")
            self._emit(out, self._raw_call(), final=final)
        self.call_text, self.bare = "", False

    def finish(self) -> ParsedDelta:
        out = ParsedDelta()
        rest, self.buf = self.buf, ""
        if self.mode == "call":
            self.call_text += rest
            self._unclosed(out, "", final=True)
            return out
        if rest:
            self._emit(out, rest, final=True)
        self.pending_ws = ""
        return out


def parse_output(text: str, tools: list[dict] | None = None, thinking_open: bool = False) -> ParsedDelta:
    """Parse a complete output at once (same result as streaming it)."""
    p = OutputParser(tools, thinking_open)
    out = p.feed(text)
    out += p.finish()
    return out
