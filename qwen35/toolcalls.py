"""Parsing model output as it streams: reasoning, content and tool calls.

A state machine over text (not tokens), fed any split of the stream; the concatenated results never depend
on where the splits fall, because a possible partial tag at the end of a piece is held back until the
next piece decides it.

(One state machine, kept whole: its tag states cut across reasoning, content and tool calls, which is why
the file runs past ~300 lines.)

- `<think>...</think>` is reasoning, including when the prompt already opened `<think>` (pass
  thinking_open=True) and when `</think>` never comes (then everything is reasoning).
- `<tool_call>...</tool_call>` holds either the XML form Qwen3.5 is trained on
  (`<function=NAME><parameter=ARG>value</parameter>...</function>`, any parameter order, multi-line values)
  or the JSON form `{"name": ..., "arguments": {...}}`. Calls are recognised in content and inside
  `<think>` alike. Values are coerced by the tool's JSON schema when it is known (tool_schema.py).
- Malformed calls (unclosed tags, unknown function, bad JSON) never raise: their raw text is kept as
  content and the problem is reported in `errors`.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from .tool_schema import coerce, tool_schemas

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
FUNC_OPEN, FUNC_CLOSE = "<function=", "</function>"  # a bare call (no <tool_call> around it), when tools were offered


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


@dataclass
class CallDelta:
    """A piece of a tool call as it streams (OpenAI's shape): the first piece of call `index` carries its id
    and name; the `arguments` pieces of a call, joined, are exactly its final `arguments_json()`."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ParsedDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)  # complete calls
    call_deltas: list[CallDelta] = field(default_factory=list)  # the same calls, streamed in pieces
    errors: list[str] = field(default_factory=list)

    def __iadd__(self, other: ParsedDelta) -> ParsedDelta:
        self.reasoning += other.reasoning
        self.content += other.content
        self.tool_calls += other.tool_calls
        self.call_deltas += other.call_deltas
        self.errors += other.errors
        return self


_FUNC = re.compile(r"<function=([^>\n]+)>(.*?)(?:</function>|$)", re.S)
# A value ends at a </parameter> that the next parameter, </function> or the end follows (so code holding
# "</parameter" or "<" stays in the value), or, when </parameter> is missing, where the next parameter or
# </function> starts. _PARAM_DONE: the same, only values whose end has been seen (for streaming).
_NEXT = r"(?=\s*(?:<parameter=[^>\n]+>|</function>|$))"
_PARAM = re.compile(r"<parameter=([^>\n]+)>(.*?)(?:</parameter>" + _NEXT + r"|(?=<parameter=[^>\n]+>)|(?=</function>)|$)",
                    re.S)
_PARAM_DONE = re.compile(r"<parameter=([^>\n]+)>(.*?)(?:</parameter>(?=\s*(?:<parameter=[^>\n]+>|</function>))"
                         r"|(?=<parameter=[^>\n]+>)|(?=</function>))", re.S)
_FUNC_OPEN = re.compile(r"<function=([^>\n]+)>")


def _param_value(raw: str, schema: dict | None, params: dict) -> Any:
    # the format puts the value on its own lines: drop exactly one newline on each side (with </parameter>
    # missing, the newline before the next tag too)
    raw = raw[1:] if raw.startswith("\n") else raw
    raw = raw[:-1] if raw.endswith("\n") else raw
    return coerce(raw, schema, params)


def _xml_args(body: str, params: dict, done_only: bool = False) -> list[tuple[str, Any]]:
    """(name, value) of each parameter in a function body (the text after `<function=NAME>`), in order; a
    name given twice keeps its first value (so streamed pieces and the final arguments always agree).
    params: the function's parameters schema ({} when unknown)."""
    end = body.find("</function>")
    body = body if end < 0 else body[: end + len("</function>")]
    props = params.get("properties") if isinstance(params, dict) else None
    props = props if isinstance(props, dict) else {}
    out, seen = [], set()
    for m in (_PARAM_DONE if done_only else _PARAM).finditer(body):
        key = m.group(1).strip()
        if key not in seen:
            seen.add(key)
            out.append((key, _param_value(m.group(2), props.get(key), params)))
    return out


def parse_call_body(body: str, schemas: dict[str, dict] | None) -> tuple[ToolCall | None, str | None]:
    """One `<tool_call>` body -> (call, None) or (None, reason)."""
    text = body.strip()
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            return None, f"tool call is not valid JSON ({e.msg})"
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None, "JSON tool call needs a string 'name'"
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                return None, f"arguments of tool call '{obj['name']}' are not valid JSON"
        if not isinstance(args, dict):
            return None, f"arguments of tool call '{obj['name']}' must be an object"
        name = obj["name"]
    else:
        m = _FUNC_OPEN.search(text)
        if not m:
            return None, "tool call has no <function=NAME> block"
        name = m.group(1).strip()
        args = dict(_xml_args(text[m.end():], (schemas or {}).get(name, {})))
    if schemas is not None and name not in schemas:
        return None, f"model called unknown function '{name}'"
    return ToolCall(name, args), None


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
        self.calls = 0  # index of the next tool call
        self.partial: dict | None = None  # the XML call being streamed: id, name, fragments sent
        self.bare = False  # the call in progress is a <function=...> block without <tool_call>

    def _tags(self) -> tuple[str, ...]:
        if self.mode == "call":
            return (FUNC_CLOSE,) if self.bare else (CALL_CLOSE,)
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
                    self.call_text += before + (FUNC_CLOSE if self.bare else "")
                    self._stream_partial(out)
                    self._close_call(out)
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
                self._stream_partial(out)
            else:
                self._emit(out, ready)
            break
        return out

    def _stream_partial(self, out: ParsedDelta) -> None:
        """Send the name of an XML call as soon as it is known, and each parameter once it is closed."""
        if self.call_text.lstrip().startswith("{"):
            return  # the JSON form is sent whole when it closes
        if self.partial is None:
            m = _FUNC_OPEN.search(self.call_text)
            if not m or (self.schemas is not None and m.group(1).strip() not in self.schemas):
                return
            name = m.group(1).strip()
            self.partial = {"id": "call_" + uuid.uuid4().hex[:24], "name": name, "sent": [], "start": m.end()}
            out.call_deltas.append(CallDelta(self.calls, self.partial["id"], name, ""))
        p = self.partial
        done = _xml_args(self.call_text[p["start"]:], (self.schemas or {}).get(p["name"], {}), done_only=True)
        for key, value in done[len(p["sent"]):]:
            piece = ("{" if not p["sent"] else ", ") + json.dumps(key, ensure_ascii=False) + ": " + \
                json.dumps(value, ensure_ascii=False)
            p["sent"].append(piece)
            out.call_deltas.append(CallDelta(self.calls, arguments=piece))

    def _deliver(self, out: ParsedDelta, call: ToolCall) -> None:
        """A complete call: finish (or send whole) its streamed pieces."""
        final = call.arguments_json()
        p, self.partial = self.partial, None
        if p is not None and p["name"] == call.name:
            call.id = p["id"]
            sent = "".join(p["sent"])
            if final.startswith(sent):
                out.call_deltas.append(CallDelta(self.calls, arguments=final[len(sent):]))
            else:  # cannot happen for well-formed calls; say so rather than send wrong arguments silently
                out.errors.append(f"streamed arguments of '{call.name}' differ from the final ones: {final}")
        else:
            out.call_deltas.append(CallDelta(self.calls, call.id, call.name, final))
        out.tool_calls.append(call)
        self.calls += 1

    def _abandon(self, out: ParsedDelta) -> None:
        if self.partial is not None:
            out.errors.append(f"tool call '{self.partial['name']}' (index {self.calls}) was streamed in part and "
                              f"then abandoned as malformed")
            self.partial = None

    def _close_call(self, out: ParsedDelta) -> None:
        call, err = parse_call_body(self.call_text, self.schemas)
        back = self.call_return
        if call is not None:
            self._deliver(out, call)
            self.mode, self.pending_ws = back, ""
        else:
            out.errors.append(err)
            self._abandon(out)
            self.mode = back
            self._emit(out, self.call_text if self.bare else CALL_OPEN + self.call_text + CALL_CLOSE)
        self.call_text, self.bare = "", False

    def finish(self) -> ParsedDelta:
        out = ParsedDelta()
        rest, self.buf = self.buf, ""
        if self.mode == "call":
            self.call_text += rest
            call, err = parse_call_body(self.call_text, self.schemas)
            self.mode = self.call_return
            complete = "</function>" in self.call_text or self.call_text.strip().startswith("{")
            if call is not None and complete:
                self._stream_partial(out)
                self._deliver(out, call)
                out.errors.append("tool call was not closed with </tool_call>; parsed anyway")
            else:
                out.errors.append(err or f"tool call was not closed with {FUNC_CLOSE if self.bare else CALL_CLOSE}")
                self._abandon(out)
                self._emit(out, ("" if self.bare else CALL_OPEN) + self.call_text, final=True)
            self.call_text, self.bare = "", False
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
