"""ASGI middleware that keeps every exception away from uvicorn (which would log it and close the client's
keep-alive connection): a failure no handler turned into a response becomes a 500 in OpenAI's JSON shape, or,
once a stream has started, the end of that stream. It sees every response go out, so it also counts them
(metrics.RequestCounts)."""

from __future__ import annotations

import logging

from fastapi.responses import JSONResponse

from .errors import APIError
from .metrics import RequestCounts

log = logging.getLogger("qwen35.server")


class Guard:
    """ASGI middleware: an exception no handler turned into a response becomes a 500 JSON error (or, once a
    stream has started, the end of that stream) instead of reaching uvicorn, which would log it and close
    the client's keep-alive connection. Each response's status is counted in `counts`."""

    def __init__(self, app, counts: RequestCounts | None = None):
        self.app = app
        self.counts = counts or RequestCounts()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = {"started": False, "done": False}

        async def tracked(message):
            if message["type"] == "http.response.start":
                state["started"] = True
                self.counts.answered(scope["path"], message["status"])
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["done"] = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:  # logged here; the client gets no traceback
            log.exception("internal error")
            if not state["started"]:
                await JSONResponse(APIError(500, "internal server error").body(), status_code=500)(scope, receive,
                                                                                                   tracked)
            elif not state["done"]:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
