"""Pieces of OpenAI-shaped responses that need no app state: Server-Sent Events framing, the usage object,
finish reasons and logprob entries."""

from __future__ import annotations

import json


def sse(obj: dict) -> str:
    """One Server-Sent Events message."""
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


def usage(req, completion: int) -> dict:
    """OpenAI's usage object for an engine request that produced `completion` tokens (cached: prompt tokens
    reused from the prompt cache)."""
    return {"prompt_tokens": len(req.prompt), "completion_tokens": completion,
            "total_tokens": len(req.prompt) + completion,
            "prompt_tokens_details": {"cached_tokens": req.cached_tokens}}


def finish_reason(reason: str | None, calls: bool) -> str:
    """The engine's reason in OpenAI's words: a stop with tool calls is "tool_calls". A timeout after some
    tokens stays "timeout", not "length" (which says max_tokens was reached): streaming.py says why."""
    if calls and reason in ("stop", None):
        return "tool_calls"
    return {"cancelled": "stop"}.get(reason, reason or "stop")


def logprob_entry(tokenizer, item) -> dict:
    """One generated token's logprob entry, with its top alternatives, in OpenAI's shape."""
    return {**_logprob(tokenizer, item.token, item.logprob),
            "top_logprobs": [_logprob(tokenizer, i, v) for i, v in item.top_logprobs or ()]}


def _logprob(tokenizer, token: int, logprob: float) -> dict:
    # `bytes` are the token's own bytes, not its decoded text re-encoded: a token that is part of a UTF-8
    # character decodes to U+FFFD, and only its bytes let a client join it with the next one
    return {"token": tokenizer.decode([token]), "logprob": logprob, "bytes": list(tokenizer.token_bytes(token))}
