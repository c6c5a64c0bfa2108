# ruff: noqa: F811 - the fixtures imported from test_server are parameters of the tests here
"""The server against slow, many and leaving clients, slow image hosts and its own shutdown; what /metrics
counts; the smaller API surface (a model by id, HEAD /health, CORS); timeouts and budgets as errors."""

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from inprocess import free_port, serving, wait_healthy
from openai import OpenAI
from test_server import inprocess, local  # noqa: F401 - fixtures

import qwen35
from qwen35.server import app as app_mod

USER = [{"role": "user", "content": "Hello"}]


@contextlib.contextmanager
def served(local, limits=None, max_batch=2, **app_kwargs):
    """An in-process server of the chat replica, with the HTTP limits `limits` (connections.make_server)."""
    from qwen35.server.app import create_app
    from qwen35.server.engine import Engine

    model, tok = local
    eng = Engine(model, max_batch=max_batch, max_queue=8)
    with serving(create_app(eng, tok, "model", default_thinking=False, **app_kwargs), eng, **(limits or {})) as base:
        yield base, eng


def connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def trickle_until_closed(sock: socket.socket, within: float) -> tuple[float | None, bytes]:
    """Send a byte every 0.3 s (waiting on the socket in between) until the server closes the connection:
    (seconds it took, or None if it stayed open `within` seconds; what the server sent)."""
    t0, got = time.monotonic(), b""
    while time.monotonic() - t0 < within:
        try:
            sock.send(b"a")
            sock.settimeout(0.3)
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:  # reset
            return time.monotonic() - t0, got
        if not data:
            return time.monotonic() - t0, got
        got += data
    return None, got


# ---- slow clients: the head, the body, and how many connections ----

def test_a_trickled_head_is_cut_off_at_the_header_deadline(local):
    """A client sending its head a byte at a time held its connection forever (uvicorn's keep-alive timer
    goes at the first byte, and a new connection has none): now it is closed at --header-timeout, on a new
    connection and on a kept-alive one after its first response."""
    with served(local, {"header_timeout": 1}) as (base, _):
        fresh = connect(base)
        fresh.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        took, _ = trickle_until_closed(fresh, 15)
        assert took is not None and took < 10
        kept = connect(base)
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert kept.recv(65536).startswith(b"HTTP/1.1 200")
        kept.sendall(b"GET /health HTTP/1.1\r\nX-Slow: ")
        took, _ = trickle_until_closed(kept, 15)
        assert took is not None and took < 10
        assert httpx.get(base + "/health").status_code == 200


def test_a_trickled_body_gets_408_and_the_connection_closes(local):
    with served(local, body_timeout=1) as (base, _):
        s = connect(base)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100000\r\n\r\n{\"mess")
        took, got = trickle_until_closed(s, 15)
        assert took is not None and took < 10
        head, _, body = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower()
        err = json.loads(body)["error"]
        assert err["code"] == "body_timeout" and "--body-timeout" in err["message"]
        assert httpx.post(base + "/v1/chat/completions", json={"messages": USER, "max_tokens": 1},
                          timeout=60).status_code == 200


def test_requests_past_max_connections_get_503(local):
    with served(local, {"max_connections": 2}) as (base, _):
        with httpx.Client() as a, httpx.Client() as b:  # two kept-alive connections (uvicorn keeps them 5 s)
            assert a.get(base + "/health").status_code == 200 and b.get(base + "/health").status_code == 200
            assert httpx.get(base + "/v1/models").status_code == 503  # a third
        deadline = time.monotonic() + 20  # the two are gone once the server has seen them close
        while httpx.get(base + "/v1/models").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)


# ---- remote images: a deadline, and threads of their own ----

class TrickleHost:
    """An image host that sends a PNG's first byte, then one more every 0.2 s, until `release`d."""

    def __init__(self):
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.release, self.connected = threading.Event(), threading.Semaphore(0)
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            threading.Thread(target=self.handle, args=(c,), daemon=True).start()

    def handle(self, c):
        with c:
            try:
                c.recv(4096)
                c.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\n\r\n\x89")
                self.connected.release()
                while not self.release.wait(0.2):
                    c.sendall(b"P")
            except OSError:
                pass

    def url(self):
        return f"http://127.0.0.1:{self.port}/x.png"

    def close(self):
        self.release.set()
        self.srv.close()


@pytest.fixture(scope="module")
def vision_local(vision_chat_model):
    _, path = vision_chat_model
    return qwen35.load(path, dtype=torch.float32)


def image_message(url):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "what"}]}]


def test_a_trickling_image_host_is_cut_off_at_the_deadline(vision_local, monkeypatch):
    from qwen35.server import images

    monkeypatch.setattr(images, "REMOTE_DEADLINE_S", 1.0)
    host = TrickleHost()
    try:
        with served(vision_local, allow_remote_images=True) as (base, _):
            t0 = time.monotonic()
            r = httpx.post(base + "/v1/chat/completions", json={"messages": image_message(host.url()),
                                                                "max_tokens": 1}, timeout=30)
            assert r.status_code == 400 and time.monotonic() - t0 < 15
            err = r.json()["error"]
            assert err["param"] == "messages[0].content[0]" and "did not finish within 1 s" in err["message"]
    finally:
        host.close()


def test_slow_image_hosts_do_not_hold_up_text_requests(vision_local):
    """Two requests whose images trickle in (held here) took both preparation threads, and a plain "hi" waited
    for them; fetches now have threads of their own."""
    host = TrickleHost()
    try:
        with served(vision_local, allow_remote_images=True) as (base, _):
            body = {"messages": image_message(host.url()), "max_tokens": 1}
            slow = [threading.Thread(target=httpx.post, args=(base + "/v1/chat/completions",),
                                     kwargs={"json": body, "timeout": 90}) for _ in range(2)]
            for t in slow:
                t.start()
            assert host.connected.acquire(timeout=60) and host.connected.acquire(timeout=60)  # both fetching
            r = httpx.post(base + "/v1/chat/completions", json={"messages": USER, "max_tokens": 1}, timeout=30)
            assert r.status_code == 200
            host.release.set()
            for t in slow:
                t.join(60)
    finally:
        host.close()


# ---- /metrics ----

def metric(text: str, name: str) -> float:
    return float(next(line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith(name + " ")))


def test_decode_speed_counts_tokens_not_steps(local):
    """With several rows, each decode step makes a token per row: the gauge said steps per second."""
    with served(local, max_batch=4) as (base, eng):
        body = {"messages": USER, "max_tokens": 12, "ignore_eos": True}
        threads = [threading.Thread(target=httpx.post, args=(base + "/v1/chat/completions",),
                                    kwargs={"json": body, "timeout": 120}) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        s = eng.stats
        decoded = s["generated_tokens"] - s["ttft_count"]  # each request's first token is sampled at prefill
        assert s["decode_tokens"] == decoded and decoded > s["decode_steps"]  # the rows shared steps
        gauge = metric(httpx.get(base + "/metrics").text, "qwen35_decode_tokens_per_second")
        assert gauge == pytest.approx(decoded / s["decode_time"], rel=1e-3, abs=1e-3)


def test_every_response_is_counted(inprocess, monkeypatch):
    """401s, 400s, 413s, 404s, 429s and the middleware's own 500s were never counted: requests_total counted
    what reached the engine, request_errors_total generation failures only."""
    base, _ = inprocess(max_queue=0, api_key="k", max_request_bytes=2**16)
    key = {"Authorization": "Bearer k"}

    def chat(body, **kw):
        return httpx.post(base + "/v1/chat/completions", json=body, headers=kw.get("headers", key), timeout=60)

    assert httpx.get(base + "/v1/models", headers=key).status_code == 200
    assert httpx.get(base + "/v1/models").status_code == 401
    assert chat({"messages": USER, "temperature": 5}).status_code == 400
    assert chat({"messages": [{"role": "user", "content": "x" * 2**17}]}).status_code == 413
    assert chat({"messages": USER, "model": "other"}).status_code == 404
    assert chat({"messages": USER, "max_tokens": 1}).status_code == 429

    def broken(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(app_mod, "parse_messages", broken)
    assert chat({"messages": USER}).status_code == 500
    assert httpx.get(base + "/health").status_code == 200  # monitoring's polls are not requests
    text = httpx.get(base + "/metrics", headers=key).text
    assert metric(text, "qwen35_requests_total") == 7 and metric(text, "qwen35_request_errors_total") == 6
    for status in (200, 400, 401, 404, 413, 429, 500):
        assert metric(text, f'qwen35_responses_total{{status="{status}"}}') == 1


# ---- the API's smaller surface ----

def test_a_model_by_id_head_health_and_cors(inprocess):
    import openai

    base, _ = inprocess(api_key="k", cors_origins=["http://ui.example"])
    c = OpenAI(base_url=base + "/v1", api_key="k", max_retries=0)
    assert c.models.retrieve("model").id == "model"
    with pytest.raises(openai.NotFoundError) as e:
        c.models.retrieve("Qwen/Qwen3.5-0.8B")  # (an id with a slash reaches the route too)
    assert e.value.body["code"] == "model_not_found" and e.value.body["type"] == "not_found_error"
    head = httpx.head(base + "/health")
    assert head.status_code == 200 and head.content == b""
    pre = httpx.options(base + "/v1/chat/completions", headers={
        "Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://ui.example"
    assert "authorization" in pre.headers["access-control-allow-headers"].lower()
    refused = httpx.get(base + "/v1/models", headers={"Origin": "http://ui.example"})  # errors are readable too
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "http://ui.example"
    other = httpx.get(base + "/v1/models", headers={"Origin": "http://evil.example", "Authorization": "Bearer k"})
    assert "access-control-allow-origin" not in other.headers
    plain, _ = inprocess()  # off by default
    r = httpx.get(plain + "/v1/models", headers={"Origin": "http://ui.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_serve_flags():
    from qwen35.commands import serve

    p = argparse.ArgumentParser()
    serve.setup_parser(p)
    a = p.parse_args(["--cors-origin", "http://a.example", "--cors-origin", "*", "--header-timeout", "2",
                      "--body-timeout", "3", "--send-timeout", "4", "--max-connections", "9", "--shutdown-timeout",
                      "0"])
    assert a.cors_origin == ["http://a.example", "*"] and (a.header_timeout, a.body_timeout, a.send_timeout) == (2, 3, 4)
    assert (a.max_connections, a.shutdown_timeout) == (9, 0)
    d = p.parse_args([])
    assert d.cors_origin is None and d.header_timeout > 0 and d.body_timeout > 0 and d.send_timeout > 0
    assert d.max_connections > 0


# ---- timeouts and budgets ----

def sse_events(r: httpx.Response) -> list:
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:])
            for line in r.iter_lines() if line.startswith("data: ")]


def test_timeouts_are_told_apart_from_max_tokens(local):
    """A timeout answered 200 with finish_reason "length", as if max_tokens had been reached; queued until it
    passed, with no token at all. Now: tokens by then -> "timeout"; none -> 503 code "timeout"."""
    from qwen35.sampling import SamplingParams
    from qwen35.server.engine import Request

    _, tok = local
    with served(local, max_batch=1, request_timeout=2.0) as (base, eng):
        long = {"messages": USER, "max_tokens": 100_000, "ignore_eos": True}
        r = httpx.post(base + "/v1/chat/completions", json=long, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "timeout"
        assert r.json()["usage"]["completion_tokens"] > 0
        # the batch's one place taken (by a request with no timeout), the next one waits till it times out
        busy = eng.submit(Request(tok.encode("busy"), SamplingParams(temperature=0, max_tokens=100_000,
                                                                     stop_token_ids=(-1,))))
        try:
            assert busy.out.get(timeout=60).token is not None  # running
            r = httpx.post(base + "/v1/chat/completions", json={"messages": USER, "max_tokens": 5}, timeout=60)
            assert r.status_code == 503 and r.json()["error"]["code"] == "timeout"
            with httpx.stream("POST", base + "/v1/chat/completions", timeout=60,
                              json={"messages": USER, "max_tokens": 5, "stream": True}) as s:
                events = sse_events(s)
            assert events[-2]["error"]["code"] == "timeout" and events[-1] == "[DONE]"
            text = httpx.get(base + "/metrics").text
            assert metric(text, 'qwen35_stream_errors_total{status="503"}') == 1
        finally:
            busy.cancel()


def test_a_request_over_the_memory_budget_is_a_400(local):
    from qwen35.server.engine import Engine

    model, _ = local
    budget = Engine(model, thread=False).request_bytes(64, 64)
    with served(local) as (base, eng):
        eng.memory_budget = budget
        r = httpx.post(base + "/v1/chat/completions", json={"messages": USER, "max_tokens": 5000})
        err = r.json()["error"]
        assert r.status_code == 400 and err["code"] == "insufficient_memory"
        assert "memory budget" in err["message"] and "--memory-budget" in err["message"]


# ---- chat_template_kwargs that break the call ----

def test_template_kwargs_that_break_rendering_are_400s(inprocess, local):
    import copy

    _, tok = local
    base, _ = inprocess()
    r = httpx.post(base + "/v1/chat/completions", json={"messages": USER, "chat_template_kwargs": {"self": 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"
    broken = copy.copy(tok)
    broken.chat_template = copy.copy(tok.chat_template)

    def refuses(*a, **k):
        raise ValueError("a value this template cannot take")

    broken.chat_template.render_segments = refuses
    base, _ = inprocess(tokenizer=broken)
    r = httpx.post(base + "/v1/chat/completions", json={"messages": USER, "chat_template_kwargs": {"x": 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"
    assert "ValueError: a value this template cannot take" in r.json()["error"]["message"]
    assert "Traceback" not in r.text


# ---- shutdown ----

def test_draining_refuses_new_requests_and_ends_running_streams(inprocess):
    """A drain (what qwen35 serve does on SIGTERM / Ctrl-C): a running stream ends with an error event and
    [DONE], a body still arriving gets 503 at once (not at its deadline), and so do new requests."""
    base, eng = inprocess()
    arriving = connect(base)
    arriving.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
    with httpx.stream("POST", base + "/v1/chat/completions", timeout=60,
                      json={"messages": USER, "max_tokens": 100_000, "ignore_eos": True, "stream": True}) as s:
        lines = s.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # under way
        eng.drain(0.5)
        rest = [line for line in lines if line.startswith("data: ")]
    assert json.loads(rest[-2][6:])["error"]["code"] == "server_shutting_down" and rest[-1] == "data: [DONE]"
    took, got = trickle_until_closed(arriving, 15)
    assert took is not None and got.startswith(b"HTTP/1.1 503") and b"server_shutting_down" in got
    assert httpx.get(base + "/health").status_code == 503
    r = httpx.post(base + "/v1/chat/completions", json={"messages": USER, "max_tokens": 1})
    assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutting_down"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_shuts_down_gracefully(chat_model_dir, sig):
    """On SIGTERM / Ctrl-C the engine stopped at once: a stream in flight got nothing more, then its connection
    closed mid-body. Now: a queued request gets a 503, the running stream goes on for --shutdown-timeout and
    ends with an error event and [DONE], and the process exits 0. (The server's --header-timeout and
    --body-timeout are checked here too: they are its flags.)"""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qwen35", "serve", str(chat_model_dir), "--port", str(port),
                             "--dtype", "float32", "--max-batch", "1", "--no-think", "--shutdown-timeout", "1",
                             "--header-timeout", "1", "--body-timeout", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc)
        slow = connect(base)
        slow.sendall(b"GET /health HTTP/1.1\r\nX-Slow: ")
        assert trickle_until_closed(slow, 15)[0] is not None
        slow = connect(base)
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
        assert trickle_until_closed(slow, 15)[1].startswith(b"HTTP/1.1 408")
        queued = {}
        long = {"messages": USER, "max_tokens": 100_000, "ignore_eos": True}
        with httpx.stream("POST", base + "/v1/chat/completions", json={**long, "stream": True}, timeout=60) as s:
            lines = s.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            waiter = threading.Thread(target=lambda: queued.update(r=httpx.post(
                base + "/v1/chat/completions", json=long, timeout=60)))
            waiter.start()
            deadline = time.monotonic() + 30
            while "qwen35_queue_depth 1" not in httpx.get(base + "/metrics").text:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            proc.send_signal(sig)
            rest = [line for line in lines if line.startswith("data: ")]
        waiter.join(30)
        assert queued["r"].status_code == 503 and queued["r"].json()["error"]["code"] == "server_shutting_down"
        assert json.loads(rest[-2][6:])["error"]["code"] == "server_shutting_down" and rest[-1] == "data: [DONE]"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_client_that_stops_reading_is_dropped_and_its_stream_ended():
    """A client that asks for a stream and never reads fills the socket's buffers; past send_timeout the
    connection is dropped and the stream's generator ended (as for a client that left: the engine request is
    cancelled there, test_disconnect_mid_stream_then_next_request). uvicorn alone waited for it forever. The
    stream is 1 MiB chunks, so the buffers fill at once (the chat replica would take minutes)."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    from qwen35.server.connections import make_server

    ended, sent = threading.Event(), []

    async def chunks():
        try:
            while True:
                sent.append(1)
                yield b"x" * (1 << 20)
                await asyncio.sleep(0)  # as the server's streams wait for tokens: the loop sees the disconnect
        finally:
            ended.set()

    app = FastAPI()
    app.get("/stream")(lambda: StreamingResponse(chunks()))
    port = free_port()
    srv = make_server(app, "127.0.0.1", port, send_timeout=1)
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    try:
        wait_until = time.monotonic() + 30
        while not srv.started:
            assert time.monotonic() < wait_until
            time.sleep(0.05)
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        t0 = time.monotonic()
        sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        assert ended.wait(30), "the stream nobody reads is still open"
        assert time.monotonic() - t0 >= 1 and len(sent) < 64  # the deadline's doing, not the end of a stream
        wait_until = time.monotonic() + 10
        while srv.server_state.connections:  # the server's side is gone (what --max-connections counts)
            assert time.monotonic() < wait_until
            time.sleep(0.05)
        sock.close()
    finally:
        srv.should_exit = True
        th.join(timeout=10)
