"""The HTTP server's limits on connections (uvicorn, h11): what a slow, idle or non-reading client may hold.

uvicorn bounds a request head's size (h11's max incomplete event, 16 KiB by default) and an idle keep-alive
connection (`timeout_keep_alive`, 5 s, from the end of a response), but not time: any byte cancels the keep-alive
timer, and a new connection has none, so a client trickling its head a byte at a time held a connection (and its
file descriptor) forever; 300 of them stayed open 45 s. Deadlines adds the bounds:
- the head: from the moment a connection opens or a response ends, the next request's head must arrive within
  `header_timeout` seconds, else the connection is closed (there is no request to answer yet);
- the answer: a client that stops reading fills the socket's buffers, and uvicorn then waits for it to read
  before it sends more, with no limit: four clients that asked for long streams and never read held all of
  `--max-connections 4` for as long as they liked, and every other request got 503. Once a response has waited
  `send_timeout` seconds in a row for the client to read, the connection is dropped; the request is cancelled
  as for a client that left, which frees its place in the batch.
The body has its own deadline in the app (a slow body gets 408: intake.py); `max_connections` is uvicorn's
limit_concurrency (a request on a connection past it gets uvicorn's plain-text 503, and its connection is
closed), which bounds what many clients together hold.
"""

from __future__ import annotations

import math

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_BODY_TIMEOUT_S = 60.0  # an 8 MiB body over ~1 Mbit/s
DEFAULT_SEND_TIMEOUT_S = 60.0  # a client reading less than ~48 KiB (the transport's high - low water marks) a minute
DEFAULT_MAX_CONNECTIONS = 512  # well under the usual 1024 open files, with the model's and threads' to spare


class Deadlines(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's head and on a client that does not read (set
    `header_timeout` and `send_timeout` on a subclass: `with_deadlines`)."""

    header_timeout = DEFAULT_HEADER_TIMEOUT_S
    send_timeout = DEFAULT_SEND_TIMEOUT_S
    _head_timer = None
    _send_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()  # the next request's head: a deadline of its own

    def connection_lost(self, exc) -> None:
        for timer in (self._head_timer, self._send_timer):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        """The transport's buffer is full (the client is not reading what was sent): it has send_timeout to."""
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.send_timeout, self._send_late)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _arm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_late)

    def _head_late(self) -> None:
        self._head_timer = None
        # a request under way (its head came in time) is the body deadline's and the request timeout's business
        waiting = self.cycle is None or self.cycle.response_complete
        if waiting and not self.transport.is_closing():
            try:
                self.conn.send(h11.ConnectionClosed())
            except h11.LocalProtocolError:
                pass
            self.transport.close()

    def _send_late(self) -> None:
        self._send_timer = None
        # abort, not close: close would wait to flush the very buffer the client does not read. connection_lost
        # follows, which marks the response disconnected and lets its pending send return
        self.transport.abort()


def with_deadlines(header_timeout: float = DEFAULT_HEADER_TIMEOUT_S,
                   send_timeout: float = DEFAULT_SEND_TIMEOUT_S) -> type[Deadlines]:
    return type("Deadlines", (Deadlines,), {"header_timeout": header_timeout, "send_timeout": send_timeout})


def make_server(app, host: str, port: int, header_timeout: float = DEFAULT_HEADER_TIMEOUT_S,
                max_connections: int | None = DEFAULT_MAX_CONNECTIONS, graceful_s: float | None = None,
                log_level: str = "warning", send_timeout: float = DEFAULT_SEND_TIMEOUT_S) -> uvicorn.Server:
    """uvicorn serving `app` with these limits. graceful_s: on shutdown, how long responses under way may take
    before uvicorn cancels them (None: no limit)."""
    return uvicorn.Server(uvicorn.Config(
        app, host=host, port=port, log_level=log_level, http=with_deadlines(header_timeout, send_timeout),
        # uvicorn refuses when the open connections, the asking one among them, reach its limit: one more than ours
        limit_concurrency=None if max_connections is None else max_connections + 1,
        timeout_graceful_shutdown=None if graceful_s is None else max(1, math.ceil(graceful_s))))
