"""OpenAI request validation and error bodies.

Every rejected request gets OpenAI's JSON error shape with the offending parameter named. Parameters we
cannot honour yet (response_format, n > 1, echo) are refused with 400, never silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..sampling import SamplingError, SamplingParams


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                              429: "rate_limit_error"}.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


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


def _num(body: dict, key: str, kind, lo=None, hi=None, default=None):
    v = body.get(key, default)
    if v is None:
        return default
    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    if kind is int:
        ok = ok and float(v).is_integer()
    if not ok:
        raise bad(key, f"'{key}' must be {'an integer' if kind is int else 'a number'}, got {v!r}")
    v = kind(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise bad(key, f"'{key}' must be between {lo} and {hi}, got {v}")
    return v


def parse_options(body: dict, eos_ids: list[int], default_thinking: bool | None, chat: bool,
                  default_template_kwargs: dict | None = None) -> GenerationOptions:
    if not isinstance(body, dict):
        raise bad("body", "the request body must be a JSON object")
    if body.get("response_format") not in (None, {"type": "text"}):
        raise bad("response_format", "'response_format' (structured output) is not supported yet")
    if _num(body, "n", int, 1, None, 1) != 1:
        raise bad("n", "only n=1 is supported")
    if body.get("echo"):
        raise bad("echo", "'echo' is not supported yet")
    max_tokens = _num(body, "max_completion_tokens", int, 1, None) or _num(body, "max_tokens", int, 1, None) or 1024
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 16):
        raise bad("stop", "'stop' must be a string or a list of at most 16 strings")
    top_k = _num(body, "top_k", int, -1, None, 0)
    logprobs = body.get("logprobs", False)
    if chat:
        if not isinstance(logprobs, bool):
            raise bad("logprobs", "'logprobs' must be a boolean")
        top_logprobs = _num(body, "top_logprobs", int, 0, 20, 0)
    else:  # completions: logprobs is the number of alternatives
        top_logprobs = _num(body, "logprobs", int, 0, 5, 0) if logprobs not in (None, False) else 0
        logprobs = logprobs not in (None, False)
    logit_bias = body.get("logit_bias") or {}
    if not isinstance(logit_bias, dict):
        raise bad("logit_bias", "'logit_bias' must be an object of token id -> bias")
    try:
        bias = {int(k): float(v) for k, v in logit_bias.items()}
    except (TypeError, ValueError):
        raise bad("logit_bias", "'logit_bias' keys must be token ids and values numbers") from None
    try:
        params = SamplingParams(
            temperature=_num(body, "temperature", float, 0, 2, 1.0),
            top_p=_num(body, "top_p", float, 0, 1, 1.0) or 1e-6,
            top_k=max(top_k, 0),
            min_p=_num(body, "min_p", float, 0, 1, 0.0),
            presence_penalty=_num(body, "presence_penalty", float, -2, 2, 0.0),
            frequency_penalty=_num(body, "frequency_penalty", float, -2, 2, 0.0),
            repetition_penalty=_num(body, "repetition_penalty", float, 0.01, 10, 1.0),
            logit_bias=bias, seed=_num(body, "seed", int, None, None),
            max_tokens=max_tokens, stop_token_ids=tuple(eos_ids), logprobs=bool(logprobs) or top_logprobs > 0,
            top_logprobs=top_logprobs,
        )
    except SamplingError as e:
        raise bad(str(e).split("=")[0], str(e)) from None
    stream_options = body.get("stream_options") or {}
    thinking = default_thinking
    effort = body.get("reasoning_effort")
    if effort is not None:
        if effort not in ("none", "minimal", "low", "medium", "high"):
            raise bad("reasoning_effort", "'reasoning_effort' must be none, minimal, low, medium or high")
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
    for key in ("messages", "tools", "add_generation_prompt"):
        if key in kwargs:
            raise bad("chat_template_kwargs", f"'chat_template_kwargs.{key}' is set by the request itself")
    template_kwargs = {**(default_template_kwargs or {}), **kwargs}
    tools = body.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise bad("tools", "'tools' must be a list of tool objects")
    tool_choice = body.get("tool_choice", "auto")
    if tools and isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        chosen = [t for t in tools if (t.get("function") or t).get("name") == name]
        if not chosen:
            raise bad("tool_choice", f"'tool_choice' names function {name!r}, which is not in 'tools'")
        tools = chosen
    elif tool_choice not in ("auto", "none", "required", None):
        raise bad("tool_choice", "'tool_choice' must be auto, none, required or a named function")
    if tool_choice == "none":
        tools = None
    return GenerationOptions(params, stop, bool(body.get("stream", False)), bool(stream_options.get("include_usage")),
                             thinking, tools or None, tool_choice, template_kwargs)
