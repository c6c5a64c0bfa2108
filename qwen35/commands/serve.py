"""Serve a model over an OpenAI-compatible HTTP API (chat completions, completions, models, metrics).

Requests decode together in one batch (continuous batching); repeated prompt prefixes and earlier turns
of a conversation are restored from cache snapshots instead of being prefilled again.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .common import (
    POSITIVE,
    add_model_args,
    add_speculative_args,
    check_speculative_flags,
    integer,
    nonempty,
    number,
    speculation_from_args,
)


def setup_parser(p: argparse.ArgumentParser) -> None:
    from ..memory import memory_size
    from ..server.body import DEFAULT_MAX_REQUEST_BYTES
    from ..server.connections import (
        DEFAULT_BODY_TIMEOUT_S,
        DEFAULT_HEADER_TIMEOUT_S,
        DEFAULT_MAX_CONNECTIONS,
        DEFAULT_SEND_TIMEOUT_S,
    )
    from ..server.images import DEFAULT_MAX_IMAGE_PIXELS

    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=integer(1, 65535), default=8000)
    p.add_argument("--api-key", type=nonempty, default=None,
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health (/metrics too)")
    p.add_argument("--max-batch", type=POSITIVE, default=8, help="sequences decoded together")
    p.add_argument("--max-queue", type=POSITIVE, default=64, help="waiting requests before answering 429")
    p.add_argument("--max-request-bytes", type=POSITIVE, default=DEFAULT_MAX_REQUEST_BYTES,
                   help=f"largest request body accepted; larger ones get 413 (default {DEFAULT_MAX_REQUEST_BYTES})")
    p.add_argument("--request-timeout", type=number(0.001), default=600.0,
                   help="seconds per request: one with tokens by then ends with finish_reason \"timeout\", one "
                        "without (still queued or prefilling) gets 503 code \"timeout\" (default 600)")
    p.add_argument("--header-timeout", type=number(0.001), default=DEFAULT_HEADER_TIMEOUT_S,
                   help="seconds a request's headers may take to arrive, from the connection's start or the end of "
                        f"its last response; a slower client's connection is closed (default {DEFAULT_HEADER_TIMEOUT_S:g})")
    p.add_argument("--body-timeout", type=number(0.001), default=DEFAULT_BODY_TIMEOUT_S,
                   help="seconds a request's body may take to arrive (at most --request-timeout); a slower one gets "
                        f"408 and the connection is closed (default {DEFAULT_BODY_TIMEOUT_S:g})")
    p.add_argument("--send-timeout", type=number(0.001), default=DEFAULT_SEND_TIMEOUT_S,
                   help="seconds a response may wait for a client that does not read it (the socket's buffers "
                        "full); then the connection is dropped and the request cancelled, freeing its place "
                        f"(default {DEFAULT_SEND_TIMEOUT_S:g})")
    p.add_argument("--max-connections", type=POSITIVE, default=DEFAULT_MAX_CONNECTIONS,
                   help="open connections (streams, idle keep-alive and slow clients together) past which a "
                        f"request gets 503 (default {DEFAULT_MAX_CONNECTIONS})")
    p.add_argument("--shutdown-timeout", type=number(0), default=10.0,
                   help="on SIGTERM / Ctrl-C: new requests get 503 and queued ones end with a 503 error; running "
                        "ones may finish for this many seconds, then end with an error (a stream: an error event "
                        "and [DONE]); a second signal ends them at once (default 10)")
    p.add_argument("--cors-origin", action="append", type=nonempty, default=None, metavar="ORIGIN",
                   help="let browser pages from ORIGIN (e.g. http://localhost:3000; '*' for any) call the API; "
                        "repeat for several (default: no CORS headers)")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image_url parts (default: only inline data: URLs; fetching makes the server "
                        "a client of any address a request names)")
    p.add_argument("--max-image-pixels", type=POSITIVE, default=DEFAULT_MAX_IMAGE_PIXELS,
                   help=f"largest image accepted, width x height as sent; larger ones get 400 "
                        f"(default {DEFAULT_MAX_IMAGE_PIXELS})")
    p.add_argument("--model-name", default=None, help="id reported by /v1/models (default: the folder name)")
    p.add_argument("--prompt-cache-gb", type=number(0), default=2.0,
                   help="memory for prompt-reuse snapshots (0 disables reuse)")
    p.add_argument("--memory-budget", type=memory_size, default=None,
                   help="KV + state the requests in flight may hold together, e.g. 4GB; a request reserves "
                        "prompt + max_tokens when it starts, waits while it does not fit and gets 400 if it "
                        "never could (default: 90%% of the memory available at start, less the prompt cache)")
    p.add_argument("--prefill-chunk", type=POSITIVE, default=512,
                   help="prompt tokens fed per turn, between the running requests' decode steps (smaller: "
                        "steadier streams and quicker first tokens for short prompts beside long ones)")
    think = p.add_mutually_exclusive_group()
    think.add_argument("--think", dest="think", action="store_true", default=None)
    think.add_argument("--no-think", dest="think", action="store_false")
    p.add_argument("--no-preserve-thinking", dest="preserve_thinking", action="store_false", default=True,
                   help="render past assistant turns without their think block (the Qwen3.5 card's advice; the "
                        "next turn then re-prefills the previous answer). Default: keep it, so turns reuse it")
    add_speculative_args(p)


def main(args: argparse.Namespace) -> int:
    import signal
    import threading

    from ..memory import default_budget, format_bytes
    from ..server.app import create_app
    from ..server.connections import make_server
    from ..server.engine import Engine
    from .common import load_from_args

    check_speculative_flags(args)
    model, tokenizer = load_from_args(args)
    name = args.model_name or Path(str(args.model or "qwen35")).name
    # The engine runs on this (the main) thread, HTTP on a second one: the model's OpenMP work is faster
    # from the thread that loaded it (see Engine).
    prompt_cache_bytes = int(args.prompt_cache_gb * 2**30)
    budget = args.memory_budget if args.memory_budget is not None else default_budget(prompt_cache_bytes)
    engine = Engine(model, max_batch=args.max_batch, max_queue=args.max_queue,
                    prompt_cache_bytes=prompt_cache_bytes, thread=False, prefill_chunk_size=args.prefill_chunk,
                    speculation=speculation_from_args(args, tokenizer), memory_budget=budget)
    app = create_app(engine, tokenizer, name, api_key=args.api_key, default_thinking=args.think,
                     request_timeout=args.request_timeout, preserve_thinking=args.preserve_thinking,
                     max_request_bytes=args.max_request_bytes, allow_remote_images=args.allow_remote_images,
                     max_image_pixels=args.max_image_pixels, body_timeout=args.body_timeout,
                     cors_origins=args.cors_origin)
    if args.preserve_thinking and not tokenizer.chat_template.uses("preserve_thinking"):
        print("note: this model's chat template drops past think blocks (no 'preserve_thinking'): each turn "
              "reuses the conversation up to the previous user message and re-prefills the previous answer",
              flush=True)
    # uvicorn cancels a response still going this long after shutdown began (a client that stopped reading)
    server = make_server(app, args.host, args.port, header_timeout=args.header_timeout,
                         send_timeout=args.send_timeout, max_connections=args.max_connections,
                         graceful_s=args.shutdown_timeout + 5)

    def http() -> None:
        try:
            server.run()
        finally:
            engine.stop()  # the HTTP side ended (shutdown, or it never started: port in use): stop serving

    signals = []

    def on_signal(*_):
        # graceful: the engine refuses new requests (503) and gives running ones --shutdown-timeout; uvicorn
        # stops listening and waits for the responses under way, which all end (finished, or an error event and
        # [DONE]). A second signal: end them now. (Flags only: this runs between any two bytecodes.)
        signals.append(1)
        engine.drain(args.shutdown_timeout if len(signals) == 1 else 0)
        server.should_exit = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    web = threading.Thread(target=http, name="qwen35-http", daemon=True)
    web.start()
    while not server.started and web.is_alive():
        time.sleep(0.02)
    if server.started:
        mem = f"memory budget {format_bytes(budget)}" if budget is not None else "no memory budget (unknown RAM)"
        print(f"qwen35 serving '{name}' on http://{args.host}:{args.port}/v1 ({mem} for requests in flight)",
              flush=True)
    try:
        engine.run()  # returns once drained (every request has had its end) or stopped
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        engine.stop()
        web.join(timeout=args.shutdown_timeout + 10)  # the last events reach their clients
    if not server.started:
        print(f"qwen35 serve: could not start the HTTP server on {args.host}:{args.port}", file=sys.stderr)
        return 1
    return 0
