"""OpenAI request options: sampling, stop strings, streaming, thinking, structured output, fields.

Every rejected request gets OpenAI's JSON error shape (errors.py) with the offending parameter named. Parameters we
cannot honour yet (n > 1, echo, audio) are refused with 400, never silently ignored; a value of the wrong
type is refused, never coerced (`"stream": "no"` is an error, not a stream).

Structured output (`structured()`): OpenAI's `response_format` (json_schema with strict, json_object), our
extension `structured_outputs` ({"regex": ...} or {"grammar": Lark}), and `tool_choice` "required" or a
named function (XML tool calls whose parameters fit the schema); at most one of them per request.
Thinking budget: `max_thinking_tokens`, or `reasoning_effort` low / medium / high mapped to budgets by
guide.EFFORT_BUDGETS ("none" / "minimal" turn thinking off); `break_thinking_loops`.
The body itself is checked before any field is read (body.py); messages and tools by messages.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..chat_template import RENDER_ARGUMENTS
from ..config_fields import is_integer, is_number
from ..constrain import GrammarError, Structured
from ..guide import EFFORT_BUDGETS
from ..sampling import SamplingError, SamplingParams
from .errors import bad, show
from .messages import parse_tools

SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
# chat_template_kwargs the request sets itself: the render's own arguments (enable_thinking is read apart)
RESERVED_TEMPLATE_KWARGS = RENDER_ARGUMENTS - {"enable_thinking"}
MAX_STOP_CHARS = 1024  # per stop string: each is matched against the text at every token
# Every field a request may carry. A field outside these is refused (400 naming it), never ignored: a client
# that sends e.g. `suffix` or `functions` expects an effect we would silently not give it.
COMMON_FIELDS = frozenset((
    "model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stop",
    "seed", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "logprobs",
    "response_format", "structured_outputs", "ignore_eos", "max_thinking_tokens", "reasoning_effort",
    "break_thinking_loops", "echo", "best_of",
    # bookkeeping for the client's side that asks nothing of the answer (OpenAI's API takes them too)
    "user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
))
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                               "parallel_tool_calls", "chat_template_kwargs", "modalities"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt"}
# fields we know and cannot honour: the reason said instead of "unknown"
NOT_SUPPORTED = {
    "functions": "'functions' is the deprecated form of 'tools': send {\"tools\": [{\"type\": \"function\", "
                 "\"function\": {...}}]}",
    "function_call": "'function_call' is the deprecated form of 'tool_choice': send 'tool_choice'",
    "suffix": "'suffix' (text after the insertion point) is not supported",
    "audio": "audio output is not supported",
    "prediction": "'prediction' (predicted outputs) is not supported",
    "web_search_options": "web search is not supported",
}


@dataclass
class GenerationOptions:
    params: SamplingParams
    stop_strings: list[str]
    stream: bool
    include_usage: bool
    enable_thinking: bool | None
    tools: list[dict] | None
    tool_choice: Any
    template_kwargs: dict  # chat_template_kwargs other than enable_thinking, passed to the template
    parallel_tool_calls: bool = True  # False: the answer ends after its first complete tool call


def _num(body: dict, key: str, kind, lo=None, hi=None, default=None):
    v = body.get(key, default)
    if v is None:
        return default
    if not (is_integer(v) if kind is int else is_number(v)):  # the config reader's tests: no bool, no NaN
        raise bad(key, f"'{key}' must be {'an integer' if kind is int else 'a finite number'}, got {show(v)}")
    v = kind(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        limits = f"between {lo} and {hi}" if lo is not None and hi is not None else \
            (f"at least {lo}" if lo is not None else f"at most {hi}")
        raise bad(key, f"'{key}' must be {limits}, got {show(v)}")
    return v


def _bool(body: dict, key: str, default: bool = False) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(key, f"'{key}' must be true or false, got {show(v)}")
    return v


def _logit_bias(value: Any, vocab_size: int) -> dict[int, float]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad("logit_bias", "'logit_bias' must be an object of token id -> bias")
    out = {}
    for k, v in value.items():
        if not re.fullmatch(r"[0-9]{1,9}", k) or int(k) >= vocab_size:
            raise bad("logit_bias", f"'logit_bias' key {show(k)} is not a token id (0 to {vocab_size - 1})")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
            raise bad("logit_bias", f"'logit_bias[{k}]' must be a number between -100 and 100, got {show(v)}")
        out[int(k)] = float(v)
    return out


def parse_options(body: dict, eos_ids: list[int], default_thinking: bool | None, chat: bool,
                  default_template_kwargs: dict | None = None, vocab_size: int = 2**31) -> GenerationOptions:
    if not isinstance(body, dict):
        raise bad("body", "the request body must be a JSON object")
    _check_fields(body, CHAT_FIELDS if chat else COMPLETION_FIELDS, "chat completions" if chat else "completions")
    if _num(body, "n", int, 1, None, 1) != 1:
        raise bad("n", "only n=1 is supported")
    if _num(body, "best_of", int, 1, None, 1) != 1:
        raise bad("best_of", "only best_of=1 is supported")
    if _bool(body, "echo"):
        raise bad("echo", "'echo' is not supported yet")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise bad("modalities", "'modalities' must be [\"text\"]: this server answers in text only")
    legacy = _num(body, "max_tokens", int, 1, None)  # checked even where max_completion_tokens overrides it
    max_tokens = _num(body, "max_completion_tokens", int, 1, None, legacy) or 1024
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 16):
        raise bad("stop", "'stop' must be a string or a list of at most 16 strings")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise bad("stop", f"each stop string may be at most {MAX_STOP_CHARS} characters, got one of "
                  f"{max(len(s) for s in stop)}")
    top_k = _num(body, "top_k", int, -1, None, 0)
    if chat:
        logprobs = _bool(body, "logprobs")
        top_logprobs = _num(body, "top_logprobs", int, 0, 20, 0)
        if top_logprobs > 0 and not logprobs:  # OpenAI's rule too
            raise bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    else:  # completions: logprobs is the number of alternatives; 0 still asks for the chosen tokens' own
        logprobs = body.get("logprobs") is not None and body["logprobs"] is not False  # (0 == False)
        top_logprobs = _num(body, "logprobs", int, 0, 5, 0) if logprobs else 0
    bias = _logit_bias(body.get("logit_bias"), vocab_size)
    tools, tool_choice = parse_tools(body.get("tools"), body.get("tool_choice"))
    structured = parse_structured(body, tools if tool_choice == "required" or isinstance(tool_choice, dict) else None)
    if structured is not None and stop:
        raise bad("stop", "'stop' cannot be combined with structured output: a stop string could cut the answer "
                  "short of its grammar")
    if structured is not None and _bool(body, "ignore_eos"):
        # a complete answer allows only an end token, which would then be written out as text to max_tokens
        raise bad("ignore_eos", "'ignore_eos' cannot be combined with structured output: once the answer is "
                  "complete only an end token may follow it")
    effort = body.get("reasoning_effort")
    if effort is not None and effort not in ("none", "minimal", "low", "medium", "high"):
        raise bad("reasoning_effort", "'reasoning_effort' must be none, minimal, low, medium or high")
    budget = _num(body, "max_thinking_tokens", int, 0, None)
    if budget is None and effort is not None:
        budget = EFFORT_BUDGETS.get(effort)
    try:
        params = SamplingParams(
            temperature=_num(body, "temperature", float, 0, 2, 1.0),
            top_p=_num(body, "top_p", float, 0, 1, 1.0) or 1e-6,
            top_k=max(top_k, 0),
            min_p=_num(body, "min_p", float, 0, 1, 0.0),
            presence_penalty=_num(body, "presence_penalty", float, -2, 2, 0.0),
            frequency_penalty=_num(body, "frequency_penalty", float, -2, 2, 0.0),
            repetition_penalty=_num(body, "repetition_penalty", float, 0.01, 10, 1.0),
            logit_bias=bias, seed=_num(body, "seed", int, *SEED_RANGE),
            max_tokens=max_tokens, stop_token_ids=() if _bool(body, "ignore_eos") else tuple(eos_ids),
            logprobs=bool(logprobs) or top_logprobs > 0,
            top_logprobs=top_logprobs, structured=structured, max_thinking_tokens=budget,
            break_thinking_loops=_bool(body, "break_thinking_loops"),
        )
    except SamplingError as e:
        raise bad(str(e).split("=")[0], str(e)) from None
    stream = _bool(body, "stream")
    stream_options = body.get("stream_options")
    if stream_options is None:
        stream_options = {}
    if not isinstance(stream_options, dict):
        raise bad("stream_options", "'stream_options' must be an object such as {\"include_usage\": true}")
    unknown = sorted(set(stream_options) - {"include_usage"})
    if unknown:
        raise bad("stream_options", f"'stream_options.{unknown[0]}' is not supported (only include_usage)")
    include_usage = stream_options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad("stream_options", "'stream_options.include_usage' must be true or false")
    if include_usage and not stream:
        raise bad("stream_options", "'stream_options' applies to streams only: set 'stream': true")
    thinking = default_thinking
    if effort is not None:
        thinking = effort not in ("none", "minimal")
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise bad("chat_template_kwargs", "'chat_template_kwargs' must be an object")
    kwargs = dict(kwargs)
    if "enable_thinking" in kwargs:
        value = kwargs.pop("enable_thinking")
        if value is not None and not isinstance(value, bool):
            raise bad("chat_template_kwargs", "'chat_template_kwargs.enable_thinking' must be a boolean")
        thinking = thinking if value is None else value
    for key in sorted(RESERVED_TEMPLATE_KWARGS):
        if key in kwargs:
            raise bad("chat_template_kwargs", f"'chat_template_kwargs.{key}' is set by the request itself")
    template_kwargs = {**(default_template_kwargs or {}), **kwargs}
    parallel = _bool(body, "parallel_tool_calls", True)
    return GenerationOptions(params, stop, stream, include_usage, thinking, tools, tool_choice, template_kwargs,
                             parallel)


def _check_fields(body: dict, known: frozenset, endpoint: str) -> None:
    for key, value in body.items():
        if key in NOT_SUPPORTED:
            if value is not None:  # null asks for nothing, as OpenAI reads it
                raise bad(key, NOT_SUPPORTED[key])
        elif key not in known:
            raise bad(key, f"unknown parameter {show(key)} for {endpoint}")


def parse_structured(body: dict, required_tools: list[dict] | None) -> Structured | None:
    """The one constraint of the request: response_format, structured_outputs, or the tools when tool_choice
    requires a call (required_tools); two of them at once is an error."""
    given = [k for k in ("response_format", "structured_outputs") if body.get(k) not in (None, {"type": "text"})]
    if required_tools is not None:
        given.append("tool_choice")
    if len(given) > 1:
        raise bad(given[1], f"'{given[0]}' and '{given[1]}' both constrain the answer; send one of them")
    if not given:
        return None
    try:
        if given[0] == "tool_choice":
            return Structured.tool_calls(required_tools)
        if given[0] == "response_format":
            return _response_format(body["response_format"])
        ext = body["structured_outputs"]
        if not (isinstance(ext, dict) and len(ext) == 1 and next(iter(ext)) in ("regex", "grammar")
                and isinstance(next(iter(ext.values())), str)):
            raise bad("structured_outputs", "'structured_outputs' must be {\"regex\": \"...\"} or "
                      "{\"grammar\": \"<Lark grammar>\"}")
        kind, source = next(iter(ext.items()))
        return Structured(kind, source)
    except GrammarError as e:
        raise bad(given[0], str(e)) from None


def _response_format(rf: Any) -> Structured:
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "json_object":
        return Structured.json_object()
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise bad("response_format", "'response_format.json_schema' must be an object with a 'schema' object")
        strict = spec.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise bad("response_format", "'response_format.json_schema.strict' must be true or false")
        return Structured.json_schema(spec.get("schema", {}), strict=bool(strict))
    raise bad("response_format", "'response_format.type' must be text, json_object or json_schema, got "
              f"{show(kind)}")
