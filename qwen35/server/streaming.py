"""One request's answer on its way from the engine to the endpoints: tokens read off the request's queue
(cancelling it when the client leaves), text through the stop strings and the tool-call parser, the engine's
ends turned into finishes or API errors, and the frame of a stream (its error event and [DONE]).

How an answer ends (finish_reason in OpenAI's words, responses.finish_reason):
- "stop" / "length" / "tool_calls": the model's end, a stop string or the first call (parallel_tool_calls
  false), max_tokens.
- "timeout": `--request-timeout` passed after some tokens were generated. They are kept, and the end is not
  called "length" (that says max_tokens was reached, and a client would raise max_tokens and retry). Not one of
  OpenAI's values, as vLLM's "abort" is not; llama.cpp reports its time limit (t_max_predict_ms) as "length",
  which is the ambiguity this avoids.
- No token before the timeout (queued behind a full batch, or a long prefill): there is no answer to keep, so
  it is an error, 503 `code: "timeout"` (the server was too busy to answer in time; clients retry a 503).
- The server shutting down: 503 `code: "server_shutting_down"`, for a stream as an error event after what was
  sent, then [DONE].
"""

from __future__ import annotations

import asyncio
import logging
import queue
from collections.abc import AsyncIterator, Callable

from ..toolcalls import OutputParser, ParsedDelta
from .errors import APIError, shutting_down
from .metrics import RequestCounts
from .request import Request as EngineRequest
from .responses import sse, usage
from .stop_strings import StopStrings

log = logging.getLogger("qwen35.server")


async def tokens(req: EngineRequest, request) -> AsyncIterator:
    """The engine's items for `req` up to its last one, cancelling it when the client goes away."""
    loop = asyncio.get_running_loop()
    finished = False
    try:
        n = 0
        while True:
            try:
                item = await loop.run_in_executor(None, lambda: req.out.get(timeout=0.1))
            except queue.Empty:
                if await request.is_disconnected():
                    return
                continue
            n += 1
            if n % 16 == 0 and await request.is_disconnected():
                return
            finished = item.finish_reason is not None or item.error is not None
            yield item
            if finished:
                return
    finally:
        if not finished:  # the client left (or the response was torn down): stop decoding for it
            req.cancel()


def end_error(item, produced: int) -> APIError | None:
    """The API error an engine item stands for (see the module's docstring), or None."""
    if item.error is not None:
        kind, _, why = item.error.partition(": ")
        if kind == "GrammarError":  # the request's grammar gave up mid-answer (llguidance's limits)
            return APIError(400, f"the answer's constraint failed during generation ({why})", code="constraint_failed")
        return APIError(500, "generation failed")
    if item.finish_reason == "shutdown":
        return shutting_down()
    if item.finish_reason == "timeout" and not produced:
        return APIError(503, "the request timed out (qwen35 serve --request-timeout) before its first token, waiting "
                        "for a place in the batch or reading its prompt; the server is busy", code="timeout")
    return None


async def answer(req: EngineRequest, request, opts, parser: OutputParser | None, tokenizer):
    """Yields (ParsedDelta, token item) as text arrives; the last item carries the finish. With
    parallel_tool_calls false the answer ends at its first complete tool call. An end that is an error raises
    it (APIError)."""
    text_stream = tokenizer.text_stream()
    stops = StopStrings(opts.stop_strings)
    calls = produced = 0
    async for item in tokens(req, request):
        error = end_error(item, produced)
        if error is not None:
            raise error
        produced += item.token is not None
        text = stops.feed(text_stream.add(item.token, item.finish_reason), final=item.finish_reason is not None)
        if stops.hit:
            req.cancel()
            item.finish_reason = "stop"
        delta = ParsedDelta(content=text) if parser is None else parser.feed(text)
        calls += len(delta.tool_calls)
        one_call = calls > 0 and not opts.parallel_tool_calls and item.finish_reason is None
        if one_call:
            req.cancel()
            item.finish_reason = "stop"
        if parser is not None and item.finish_reason is not None:
            delta += parser.finish()
        yield delta, item
        if stops.hit or one_call:
            return


def closing(kind: str, cid: str, created: int, model_name: str, req: EngineRequest, n: int,
            include_usage: bool) -> list[str]:
    """The end of a stream: the usage chunk when asked for, then [DONE]."""
    tail = [sse({"id": cid, "object": kind, "created": created, "model": model_name, "choices": [],
                 "usage": usage(req, n)})] if include_usage else []
    return tail + ["data: [DONE]\n\n"]


async def framed(events: AsyncIterator[str], tail: Callable[[], list[str]], counts: RequestCounts):
    """A stream's events, then `tail()` ([DONE]); a failure on the way becomes an error event (counted in
    `counts`, never a traceback) before the tail."""
    try:
        async for line in events:
            yield line
    except APIError as e:
        counts.stream_error(e.status)
        yield sse(e.body())
    except Exception:
        log.exception("internal error while streaming")
        counts.stream_error(500)
        yield sse(APIError(500, "internal server error").body())
    for line in tail():
        yield line
