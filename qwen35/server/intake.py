"""A request's way in, before the engine: the API key, the body read against its size limit and its deadline,
then parsing, validation, rendering and tokenizing on worker threads, so a 10 MB body does not stall /health or
the streams of other requests.

Threads: bodies up to SMALL_BODY are prepared on two threads that larger ones (seconds of rendering and
tokenizing at 8 MiB) never hold, and remote images are fetched on threads of their own (`Fetching`), so
neither a few large bodies nor slow image servers can hold up ordinary requests.

Deadline: the body must arrive within `body_timeout` seconds of the request's head (the app passes the smaller
of --body-timeout and --request-timeout), else 408 and the connection is closed: a client trickling its body
held a connection forever. The head's own deadline is the HTTP server's (connections.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .body import parse_json
from .errors import APIError, bad, shutting_down

SMALL_BODY = 256 * 2**10  # bodies up to this size are prepared on threads that larger ones never hold


@dataclass
class Fetching:
    """What a preparation returns when it needs remote images first: `fetch()` runs on the fetch threads, then
    `resume(what it returned)` on the preparation threads."""

    fetch: Callable[[], Any]
    resume: Callable[[Any], Any]


class Intake:
    def __init__(self, model_name: str, api_key: str | None, max_request_bytes: int, body_timeout: float,
                 draining: Callable[[], bool]):
        self.model_name, self.api_key, self.max_request_bytes = model_name, api_key, max_request_bytes
        self.body_timeout, self.draining = body_timeout, draining
        self.prep_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="qwen35-prepare")
        self.big_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="qwen35-prepare-large")
        self.fetch_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="qwen35-fetch")

    def check_auth(self, request) -> None:
        if self.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or key.strip() != self.api_key:  # the scheme's case is free (RFC 9110)
            raise APIError(401, "invalid or missing API key", code="invalid_api_key")

    def too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than this server's limit of {self.max_request_bytes} "
                        "bytes (qwen35 serve --max-request-bytes)", "body", "request_too_large")

    async def read_body(self, request) -> bytes:
        """The raw body, refused (413) as soon as it is known to pass the limit: by its Content-Length
        before reading, else while reading (uvicorn discards the unread rest, and the connection lives on).
        408 (and the connection closed) if it has not all arrived within the body deadline."""
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_request_bytes:
            raise self.too_large()
        chunks, n = [], 0
        try:
            async with asyncio.timeout(self.body_timeout):
                async for chunk in request.stream():
                    n += len(chunk)
                    if n > self.max_request_bytes:
                        raise self.too_large()
                    chunks.append(chunk)
        except TimeoutError:
            raise APIError(408, f"the request body did not arrive within {self.body_timeout:g} s (qwen35 serve "
                           "--body-timeout, at most --request-timeout)", "body", "body_timeout",
                           headers={"Connection": "close"}) from None
        return b"".join(chunks)

    async def prepared(self, request, prepare: Callable[[dict], Any]):
        """Auth, the body read, then `prepare(body dict)` on a worker thread (and a `Fetching` it returns
        carried through the fetch threads). 503 once the server begins shutting down, at whatever stage: a body
        or an image still arriving would otherwise hold the shutdown up to its deadline."""
        if self.draining():
            raise shutting_down()
        self.check_auth(request)
        work = asyncio.ensure_future(self._prepared(request, prepare))
        try:
            while not (await asyncio.wait({work}, timeout=0.25))[0]:
                if self.draining():
                    raise shutting_down()
        finally:
            work.cancel()  # (done: no-op; a thread already preparing or fetching runs out on its own, unread)
        return work.result()

    async def _prepared(self, request, prepare: Callable[[dict], Any]):
        raw = await self.read_body(request)

        def work():
            body = parse_json(raw)
            if not isinstance(body, dict):
                raise bad("body", "the request body must be a JSON object")
            model = body.get("model")
            if model is not None and not isinstance(model, str):
                raise bad("model", "'model' must be a string")
            if model not in (None, self.model_name):
                raise APIError(404, f"the model {model[:100]!r} does not exist; this server serves "
                               f"'{self.model_name}'", "model", "model_not_found")
            return prepare(body)

        loop = asyncio.get_running_loop()
        pool = self.prep_pool if len(raw) <= SMALL_BODY else self.big_pool
        out = await loop.run_in_executor(pool, work)
        if isinstance(out, Fetching):
            fetched = await loop.run_in_executor(self.fetch_pool, out.fetch)
            out = await loop.run_in_executor(pool, out.resume, fetched)
        return out
