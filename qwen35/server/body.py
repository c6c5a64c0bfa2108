"""The request body, checked before any field is read: valid UTF-8 JSON without NaN / Infinity, nested at most
MAX_DEPTH deep, no lone surrogate in any string (it cannot be encoded, so the tokenizer and the response
writer would fail on it later). Size is the app's (DEFAULT_MAX_REQUEST_BYTES, read before the body is)."""

from __future__ import annotations

import json
from typing import Any

from .errors import bad

DEFAULT_MAX_REQUEST_BYTES = 8 * 2**20  # ~2M tokens of text: above any context Qwen3.5 runs, far below harm
MAX_DEPTH = 64  # JSON nesting; OpenAI bodies need < 10, tool schemas rarely pass 20


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> Any:
    """The request body as a JSON value, or APIError 400 (param "body", or the path of the bad string)."""
    try:
        value = json.loads(raw, parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise bad("body", "the request body is not valid UTF-8") from None
    except RecursionError:
        raise bad("body", f"the request body is nested too deeply (at most {MAX_DEPTH} levels)") from None
    except ValueError as e:  # JSONDecodeError, NaN / Infinity
        raise bad("body", f"the request body is not valid JSON: {e}") from None
    _check_tree(value)
    return value


def _path(parts: tuple) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def _check_tree(value: Any) -> None:
    """Depth and lone surrogates, walked without recursion (so no depth can overflow the stack here)."""
    todo = [(value, ())]
    while todo:
        v, at = todo.pop()
        if len(at) > MAX_DEPTH:
            raise bad("body", f"the request body is nested too deeply (at most {MAX_DEPTH} levels)")
        if isinstance(v, dict):
            for k, x in v.items():
                _check_text(k, at)
                todo.append((x, at + (k,)))
        elif isinstance(v, list):
            todo.extend((x, at + (i,)) for i, x in enumerate(v))
        elif isinstance(v, str):
            _check_text(v, at)


def _check_text(s: str, at: tuple) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        param = _path(at)
        raise bad(param, f"'{param}' holds a lone surrogate (U+{ord(s[e.start]):04X}), which is not text") from None
