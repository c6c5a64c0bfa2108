"""Serving an app in this process for HTTP tests: uvicorn on a free port in a thread, stopped (with its
engine) when the block ends. One copy for every server test file."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, proc=None, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server at {base} did not become healthy in {timeout} s")


@contextlib.contextmanager
def serving(app, engine, log_level: str = "error", **limits):
    """Yields the base URL of `app` served on 127.0.0.1 (as qwen35 serve serves it: connections.make_server,
    with `limits` passed on); stops the server and `engine` afterwards."""
    from qwen35.server.connections import make_server

    port = free_port()
    srv = make_server(app, "127.0.0.1", port, log_level=log_level, **limits)
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base)
        yield base
    finally:
        srv.should_exit = True
        th.join(timeout=10)
        engine.shutdown()
