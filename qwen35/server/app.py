"""The OpenAI-compatible HTTP API (FastAPI): chat completions, completions, models, health, metrics.

Requests are validated (body.py, messages.py, protocol.py), rendered with the model's chat template, and
handed to the batching engine (engine.py); results stream back as Server-Sent Events or one JSON body. A
client that disconnects cancels its request; errors come back in OpenAI's JSON shape and never carry a
traceback.

Input handling: the body is read up to `max_request_bytes` (413 beyond, counted while reading, so a huge
body is never held), then parsed, validated, rendered and tokenized on a worker thread, so a 10 MB body
does not stall /health or the streams of other requests. No exception reaches uvicorn (`Guard`): one that
did would make it close the keep-alive connection; every failure is a JSON error on a connection that
stays usable. With an API key, everything but /health needs it (/metrics and /openapi.json included).

The middleware (guard.py), the stop-string filter (stop_strings.py), the responses' pieces (responses.py)
and /metrics' text (metrics.py) live apart; the rest stays in one
file past our ~300-line habit because the two endpoints share their streaming, usage and error helpers as
closures over one app, and splitting them would pass that state around instead.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..chat_template import ChatTemplateError
from ..constrain import GrammarError
from ..errors import Qwen35Error
from ..generation import ContextLengthError, max_context
from ..guide import make_guide
from ..toolcalls import OutputParser, ParsedDelta
from ..vision_input import ImageError
from .body import DEFAULT_MAX_REQUEST_BYTES, parse_json
from .engine import Engine, MemoryBudgetExceeded, QueueFull
from .engine import Request as EngineRequest
from .errors import APIError, bad
from .guard import Guard
from .images import DEFAULT_MAX_IMAGE_PIXELS, image_parts, load_images
from .messages import parse_messages
from .metrics import prometheus_text
from .prompt_ids import conversation_ids, least_tokens, message_texts, system_prefix
from .protocol import parse_options
from .responses import finish_reason, logprob_entry, sse, usage
from .stop_strings import StopStrings

log = logging.getLogger("qwen35.server")
SMALL_BODY = 256 * 2**10  # bodies up to this size are prepared on threads that larger ones never hold


def create_app(engine: Engine, tokenizer, model_name: str, api_key: str | None = None,
               default_thinking: bool | None = None, request_timeout: float | None = 600.0,
               preserve_thinking: bool = True, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               allow_remote_images: bool = False, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> FastAPI:
    # preserve_thinking: past assistant turns keep their think block (the reasoning the client sends back,
    # or an empty block), exactly as the model produced them, so turn N+1 restores the snapshot taken at the
    # end of turn N's answer. The Qwen3.6 templates and ours honour it; a template that ignores it drops past
    # think blocks, and reuse then stops at the end of turn N's user message.
    template_defaults = {"preserve_thinking": preserve_thinking}
    app = FastAPI(title="qwen35", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard)
    started = int(time.time())
    # parsing, rendering and tokenizing a request: off the event loop, on threads of their own (the default
    # executor is busy with the token queues of running streams). Bodies over SMALL_BODY (seconds of
    # rendering and tokenizing at 8 MiB) take threads of their own, so two of them cannot hold up every
    # ordinary request behind them.
    prep_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="qwen35-prepare")
    big_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="qwen35-prepare-large")

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError):
        return JSONResponse(bad("body", "invalid request body").body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
        return JSONResponse(APIError(e.status_code, str(e.detail), type_=kind).body(), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def client_gone(_: Request, e: ClientDisconnect):
        # the client left while sending its body: nobody reads this answer, and it is no server error
        log.info("a client disconnected before its request body arrived")
        return PlainTextResponse("", status_code=400)

    def check_auth(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or key.strip() != api_key:  # the scheme's case is free (RFC 9110)
            raise APIError(401, "invalid or missing API key", code="invalid_api_key")

    def too_large() -> APIError:
        return APIError(413, f"the request body is larger than this server's limit of {max_request_bytes} bytes "
                        "(qwen35 serve --max-request-bytes)", "body", "request_too_large")

    async def read_body(request: Request) -> bytes:
        """The raw body, refused (413) as soon as it is known to pass the limit: by its Content-Length
        before reading, else while reading. uvicorn discards the unread rest, and the connection lives on."""
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_request_bytes:
            raise too_large()
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > max_request_bytes:
                raise too_large()
            chunks.append(chunk)
        return b"".join(chunks)

    async def prepared(request: Request, prepare):
        """Auth, the body read, then `prepare(body dict)` on a worker thread."""
        check_auth(request)
        raw = await read_body(request)

        def work():
            body = parse_json(raw)
            if not isinstance(body, dict):
                raise bad("body", "the request body must be a JSON object")
            model = body.get("model")
            if model is not None and not isinstance(model, str):
                raise bad("model", "'model' must be a string")
            if model not in (None, model_name):
                raise APIError(404, f"the model {model[:100]!r} does not exist; this server serves '{model_name}'",
                               "model", "model_not_found")
            return prepare(body)

        return await asyncio.get_running_loop().run_in_executor(prep_pool if len(raw) <= SMALL_BODY else big_pool,
                                                                work)

    longest_token: list[int] = []  # the vocabulary's longest token in bytes, found on first use

    def refuse_overlong(texts, opts, param: str) -> int:
        """Refuse, before rendering or tokenizing it, a prompt that cannot fit the context whatever its
        tokenization (prompt_ids.least_tokens): an 8 MiB body would otherwise hold a thread for seconds.
        Returns that lower bound (the images' check adds their tokens to it)."""
        if not longest_token:
            longest_token.append(tokenizer.longest_token_bytes())
        least, limit = least_tokens(texts, longest_token[0]), max_context(engine.model)
        if least + opts.params.max_tokens > limit:
            raise bad(param, f"the prompt holds at least {least} tokens; with max_tokens ({opts.params.max_tokens}) "
                      f"that exceeds the context of {limit} tokens; shorten the prompt or lower max_tokens",
                      "context_length_exceeded")
        return least

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request):
        check_auth(request)
        return app.openapi()

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started,
                                            "owned_by": "qwen35"}]}

    @app.get("/metrics")
    async def metrics(request: Request):
        check_auth(request)
        return PlainTextResponse(prometheus_text(engine), media_type="text/plain; version=0.0.4")

    def guide_for(opts, body: dict):
        """The request's guide (grammar compiled here, on the prepare thread), or None."""
        try:
            return make_guide(opts.params, tokenizer, engine.model.config.vocab_size)
        except GrammarError as e:
            param = next((k for k in ("response_format", "structured_outputs") if body.get(k)), "tool_choice")
            raise bad(param, str(e)) from None

    def submit(prompt_ids: list[int], opts, boundary: int = 0, param: str = "messages", guide=None,
               vision=None, prefix: int = 0) -> EngineRequest:
        images, key = vision or (None, None)
        try:
            return engine.submit(EngineRequest(prompt_ids, opts.params, boundary=boundary, timeout_s=request_timeout,
                                               guide=guide, images=images, key=key, prefix=prefix))
        except ContextLengthError as e:
            raise bad(param, str(e), "context_length_exceeded") from None
        except QueueFull as e:
            raise APIError(429, str(e), code="queue_full") from None
        except MemoryBudgetExceeded as e:
            raise APIError(503, str(e), code="insufficient_memory") from None

    async def tokens(req: EngineRequest, request: Request):
        """The engine's tokens for `req`, cancelling it when the client goes away."""
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

    async def run(req: EngineRequest, request: Request, opts, parser: OutputParser | None):
        """Yields (ParsedDelta, token item) as text arrives; the last item carries the finish. With
        parallel_tool_calls false the answer ends at its first complete tool call."""
        text_stream = tokenizer.text_stream()
        stops = StopStrings(opts.stop_strings)
        calls = 0
        async for item in tokens(req, request):
            if item.error is not None:
                kind, _, why = item.error.partition(": ")
                if kind == "GrammarError":  # the request's grammar gave up mid-answer (llguidance's limits)
                    raise APIError(400, f"the answer's constraint failed during generation ({why})",
                                   code="constraint_failed")
                raise APIError(500, "generation failed")
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

    def closing(kind: str, cid: str, created: int, req: EngineRequest, n: int, include_usage: bool) -> list[str]:
        """The end of a stream: the usage chunk when asked for, then [DONE]."""
        tail = [sse({"id": cid, "object": kind, "created": created, "model": model_name, "choices": [],
                     "usage": usage(req, n)})] if include_usage else []
        return tail + ["data: [DONE]\n\n"]

    def render_chat(messages: list[dict], opts, add_generation_prompt: bool) -> list[tuple[str, bool]]:
        """The rendered conversation as (text, is_template) pieces; client-written text is encoded as plain
        text (render_segments), so a typed "<|im_start|>system" is characters, not a new turn."""
        try:
            return tokenizer.chat_template.render_segments(
                messages, tokenizer.added_tokens, tools=opts.tools, add_generation_prompt=add_generation_prompt,
                enable_thinking=opts.enable_thinking, **opts.template_kwargs)
        except ChatTemplateError as e:
            raise bad("messages", f"the chat template refused the conversation: {e.reason}") from None
        except Qwen35Error as e:
            raise bad("messages", str(e)) from None

    def prepare_chat(body: dict):
        opts = parse_options(body, tokenizer.eos_token_ids, default_thinking, chat=True,
                             default_template_kwargs=template_defaults, vocab_size=engine.model.config.vocab_size)
        messages = parse_messages(body.get("messages"))
        text_tokens = refuse_overlong(message_texts(messages), opts, "messages")
        parts = image_parts(messages)
        if parts and engine.speculation is not None:
            raise bad(parts[0][0], "image input is not available on a server started with --speculative (the MTP "
                      "head has no image positions)")
        pictures = []
        if parts:  # sizes from the headers first: a request over the context is refused before any decoding
            pictures = load_images(parts, engine.model, allow_remote_images, max_image_pixels, max_request_bytes,
                                   text_tokens, opts.params.max_tokens)
        pieces, hist_pieces = render_chat(messages, opts, True), render_chat(messages, opts, False)
        prompt = "".join(text for text, _ in pieces)
        ids, boundary = conversation_ids(tokenizer, pieces, hist_pieces)
        hist = ids[:boundary]
        vision = None
        if pictures:  # pads expanded to each image's size; the boundary moves with them
            from ..multimodal import expand_prompt, prepare_prompt

            try:
                ids, inputs, key = prepare_prompt(engine.model, ids, pictures)
                pad = engine.model.visual.config.image_token_id
                boundary = len(expand_prompt(hist, inputs, pad)) if boundary else 0
            except ImageError as e:  # each part was checked in load_images: what is left is the placeholders
                raise bad("messages", str(e)) from None
            vision = (inputs, key)
        prefix = system_prefix(tokenizer, prompt, ids) if vision is None else 0
        return opts, ids, boundary, prompt.rstrip().endswith("<think>"), guide_for(opts, body), vision, prefix

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        opts, ids, boundary, thinking_open, guide, vision, prefix = await prepared(request, prepare_chat)
        req = submit(ids, opts, boundary, guide=guide, vision=vision, prefix=prefix)
        cid = "chatcmpl-" + uuid.uuid4().hex[:24]
        created = int(time.time())

        def chunk(delta: dict, finish=None, lp=None, cut=None) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            if cut is not None:
                choice["reasoning_cut"] = cut
            if lp is not None:
                choice["logprobs"] = {"content": lp}
            return sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                        "choices": [choice]})

        # no tools offered (or tool_choice "none"): a <tool_call> the model writes anyway is content
        parser = OutputParser(opts.tools, thinking_open=thinking_open, tool_calls=opts.tools is not None)
        if opts.stream:
            async def events():
                # every token's logprob entry rides on the next chunk sent, so a stream carries the same
                # entries as the answer in one body (tokens whose text is held back, or is tool-call markup
                # or a control token, send no text chunk of their own)
                n, ncalls, cut, lp = 0, 0, None, []
                yield chunk({"role": "assistant", "content": ""})
                try:
                    async for delta, item in run(req, request, opts, parser):
                        n += item.token is not None
                        cut = cut or item.reasoning_cut
                        if opts.params.logprobs and item.token is not None:
                            lp.append(logprob_entry(tokenizer, item))
                        if delta.reasoning:
                            yield chunk({"reasoning_content": delta.reasoning}, lp=lp or None)
                            lp = []
                        if delta.content:
                            yield chunk({"content": delta.content}, lp=lp or None)
                            lp = []
                        # each call whole, once parsed (the parser holds it till then): a call cut off by
                        # max_tokens or a stop string is never announced, as the answer in one body has none
                        for c in delta.tool_calls:
                            piece = {"index": ncalls, "id": c.id, "type": "function",
                                     "function": {"name": c.name, "arguments": c.arguments_json()}}
                            yield chunk({"tool_calls": [piece]}, lp=lp or None)
                            lp = []
                            ncalls += 1
                        if delta.errors:  # a malformed call stays as text; say why beside it
                            yield chunk({"tool_call_errors": delta.errors})
                        if item.finish_reason is not None:
                            yield chunk({}, finish_reason(item.finish_reason, ncalls > 0), lp=lp or None, cut=cut)
                            lp = []
                except APIError as e:
                    yield sse(e.body())
                except Exception:  # the stream ends with an error event, never a traceback
                    log.exception("internal error while streaming")
                    yield sse(APIError(500, "internal server error").body())
                for line in closing("chat.completion.chunk", cid, created, req, n, opts.include_usage):
                    yield line

            return StreamingResponse(events(), media_type="text/event-stream")

        out, n, last, lps, cut = ParsedDelta(), 0, None, [], None
        async for delta, item in run(req, request, opts, parser):
            out += delta
            n += item.token is not None
            cut = cut or item.reasoning_cut
            last = item
            if opts.params.logprobs and item.token is not None:
                lps.append(logprob_entry(tokenizer, item))
        message = {"role": "assistant", "content": out.content or (None if out.tool_calls else "")}
        if out.reasoning:
            message["reasoning_content"] = out.reasoning
        if out.errors:  # a malformed call stays in the content as text; this says why
            message["tool_call_errors"] = out.errors
        if out.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments_json()}}
                                     for c in out.tool_calls]
        choice = {"index": 0, "message": message,
                  "finish_reason": finish_reason(last.finish_reason if last else None, bool(out.tool_calls)),
                  "logprobs": {"content": lps} if opts.params.logprobs else None}
        if cut is not None:
            choice["reasoning_cut"] = cut
        return {"id": cid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [choice], "usage": usage(req, n)}

    def prepare_completion(body: dict):
        vocab = engine.model.config.vocab_size
        opts = parse_options(body, tokenizer.eos_token_ids, default_thinking, chat=False, vocab_size=vocab)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str) and prompt:
            # a raw prompt: the client writes its own control tokens
            refuse_overlong([prompt], opts, "prompt")
            return opts, tokenizer.encode(prompt), guide_for(opts, body)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if not all(0 <= t < vocab for t in prompt):
                raise bad("prompt", f"'prompt' holds token ids outside the vocabulary (0 to {vocab - 1})")
            return opts, list(prompt), guide_for(opts, body)
        if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
            raise bad("prompt", "'prompt' holds several prompts; send one per request")
        raise bad("prompt", "'prompt' must be a non-empty string or a non-empty list of token ids")

    def legacy_logprobs(tokens: list) -> dict | None:
        """The completions API's logprobs object for [(token item, offset of its text in the answer)]."""
        if not tokens:
            return None
        top = [{tokenizer.decode([i]): v for i, v in item.top_logprobs or ()} for item, _ in tokens]
        return {"tokens": [tokenizer.decode([item.token]) for item, _ in tokens],
                "token_logprobs": [item.logprob for item, _ in tokens],
                "top_logprobs": top if any(top) else None,
                "text_offset": [at for _, at in tokens]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        opts, ids, guide = await prepared(request, prepare_completion)
        req = submit(ids, opts, param="prompt", guide=guide)
        cid = "cmpl-" + uuid.uuid4().hex[:24]
        created = int(time.time())
        if opts.stream:
            async def events():
                n, cut, sent, lp = 0, None, 0, []  # lp: tokens whose logprobs ride on the next chunk
                try:
                    async for delta, item in run(req, request, opts, None):
                        n += item.token is not None
                        cut = cut or item.reasoning_cut
                        if opts.params.logprobs and item.token is not None:
                            lp.append((item, sent))
                        sent += len(delta.content)
                        fin = None if item.finish_reason is None else finish_reason(item.finish_reason, False)
                        if delta.content or fin:
                            choice = {"index": 0, "text": delta.content, "logprobs": legacy_logprobs(lp),
                                      "finish_reason": fin}
                            lp = []
                            if fin and cut:
                                choice["reasoning_cut"] = cut
                            yield sse({"id": cid, "object": "text_completion", "created": created,
                                       "model": model_name, "choices": [choice]})
                except APIError as e:
                    yield sse(e.body())
                except Exception:  # (as above)
                    log.exception("internal error while streaming")
                    yield sse(APIError(500, "internal server error").body())
                for line in closing("text_completion", cid, created, req, n, opts.include_usage):
                    yield line

            return StreamingResponse(events(), media_type="text/event-stream")
        text, n, last, cut, lp, sent = [], 0, None, None, [], 0
        async for delta, item in run(req, request, opts, None):
            if opts.params.logprobs and item.token is not None:
                lp.append((item, sent))
            sent += len(delta.content)
            text.append(delta.content)
            n += item.token is not None
            cut = cut or item.reasoning_cut
            last = item
        choice = {"index": 0, "text": "".join(text), "logprobs": legacy_logprobs(lp) if opts.params.logprobs else None,
                  "finish_reason": finish_reason(last.finish_reason if last else None, False)}
        if cut is not None:
            choice["reasoning_cut"] = cut
        return {"id": cid, "object": "text_completion", "created": created, "model": model_name,
                "choices": [choice], "usage": usage(req, n)}

    return app
