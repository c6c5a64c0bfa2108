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
  `<think>` alike. Values are coerced by the tool's JSON schema when it is known.
- Malformed calls (unclosed tags, unknown function, bad JSON) never raise: their raw text is kept as
  content and the problem is reported in `errors`.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

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


def _schemas(tools: list[dict] | None) -> dict[str, dict] | None:
    if not tools:
        return None
    out = {}
    for t in tools:
        fn = t.get("function", t) if isinstance(t, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            out[fn["name"]] = fn.get("parameters") or {}
    return out


# type names real tool definitions use beside JSON Schema's own (Python's, from generated schemas)
TYPE_ALIASES = {"int": "integer", "float": "number", "double": "number", "dict": "object", "list": "array",
                "bool": "boolean", "str": "string", "none": "null"}
JSON_TYPES = ("null", "boolean", "integer", "number", "string", "array", "object")
MAX_SCHEMA_DEPTH = 64  # nesting past this is read as saying nothing more (a request's schema: no RecursionError)
_NOT_JSON = object()


def coerce(value: str, schema: dict | None, root: dict | None = None) -> Any:
    """A raw parameter string turned into a value of a type its JSON schema allows, read as the tool-call grammar
    (constrain._param_rule) writes it: a plain string or an enum of strings raw, anything else as JSON for its
    schema. JSON of an allowed type is taken as it is; else each allowed type is tried in the schema's order on
    looser spellings (True, None, +5); the text is kept when none fits. root: the tool's parameters, which
    `$ref`s point into (the schema itself when not given)."""
    if not isinstance(schema, dict) or _raw_string(schema):
        return value
    types = _types(schema, schema if root is None else root, {})
    stripped = value.strip()
    try:
        parsed = json.loads(stripped)
    except (ValueError, RecursionError):  # not JSON (or nested past Python's limit)
        parsed = _NOT_JSON
    if parsed is not _NOT_JSON and (types is None or _json_type(parsed) in types):
        return parsed
    for t in types or ():  # a schema that says nothing takes JSON only: "007" stays text
        try:
            if t == "integer":
                return int(stripped)
            if t == "number":
                f = float(stripped)
                return int(f) if f.is_integer() and re.fullmatch(r"-?\d+", stripped) else f
        except ValueError:
            continue
        if t == "boolean" and stripped.lower() in ("true", "false"):
            return stripped.lower() == "true"
        if t == "null" and stripped.lower() in ("null", "none"):
            return None
    return value


def _raw_string(schema: dict) -> bool:
    """Is this parameter's value written as raw text (constrain._param_rule: an enum of strings, or a string with
    no pattern or format; a Python type name too, which the grammar does not take)?"""
    enum = schema.get("enum")
    if isinstance(enum, list) and enum and all(isinstance(v, str) for v in enum):
        return True
    t = schema.get("type")
    return isinstance(t, str) and TYPE_ALIASES.get(t, t) == "string" and "pattern" not in schema \
        and "format" not in schema


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    return "string" if isinstance(v, str) else "array" if isinstance(v, list) else "object"


def _types(schema: Any, root: Any, refs: dict, depth: int = 0) -> list[str] | None:
    """The JSON types a value of `schema` may take, in the order the schema names them ("number" brings
    "integer"), or None where it does not say: its `type` (one or a list, Python names too, OpenAPI's
    `nullable`), `enum` / `const`, the union of `anyOf` / `oneOf`, the common part of `allOf` and a local
    `$ref`; a value must fit every one of these that the schema has. refs: each $ref's answer, worked out
    once (a $ref back into itself says nothing; and branches that name the same $ref cost nothing twice, so
    a schema cannot make this exponential)."""
    if not isinstance(schema, dict) or depth > MAX_SCHEMA_DEPTH:
        return None
    says: list[list[str] | None] = []
    t = schema.get("type")
    if isinstance(t, (str, list)):
        names = [TYPE_ALIASES.get(x, x) for x in (t if isinstance(t, list) else [t]) if isinstance(x, str)]
        says.append(names + (["null"] if schema.get("nullable") is True else []))
    if isinstance(schema.get("enum"), list):
        says.append([_json_type(v) for v in schema["enum"]])
    if "const" in schema:
        says.append([_json_type(schema["const"])])
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            branches = [_types(sub, root, refs, depth + 1) for sub in schema[key]]
            says.append(None if None in branches else [x for b in branches for x in b])
    if isinstance(schema.get("allOf"), list):
        says += [_types(sub, root, refs, depth + 1) for sub in schema["allOf"]]
    ref = schema.get("$ref")
    if isinstance(ref, str):
        if ref not in refs:
            refs[ref] = None  # while it is worked out: a cycle back to it
            refs[ref] = _types(_pointer(root, ref), root, refs, depth + 1)
        says.append(refs[ref])
    out = None
    for names in says:
        if names is not None:
            names = _with_integer([x for x in names if x in JSON_TYPES])
            out = names if out is None else [x for x in out if x in names]
    return out


def _with_integer(names: list[str]) -> list[str]:
    """Without duplicates, and "integer" after "number" (an integer is a number)."""
    out = []
    for x in names:
        out += [y for y in ((x, "integer") if x == "number" else (x,)) if y not in out]
    return out


def _pointer(root: Any, ref: str) -> dict | None:
    """The schema a local `$ref` ("#/$defs/Unit", any JSON pointer into `root`) names; None for any other."""
    if not ref.startswith("#"):
        return None  # a remote schema: never fetched
    node = root
    for part in ref[1:].split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node if isinstance(node, dict) else None


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
        self.schemas = _schemas(tools)
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
