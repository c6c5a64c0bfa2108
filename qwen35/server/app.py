"""The OpenAI-compatible HTTP API (FastAPI): chat completions, completions, models, health, metrics.

Requests come in through intake.py (API key, the body read against its size limit and deadline, preparation
on worker threads), are validated (body.py, messages.py, protocol.py), rendered with the model's chat template,
and handed to the batching engine (engine.py); results come back through streaming.py, as Server-Sent Events or
one JSON body. A client that disconnects cancels its request; errors come back in OpenAI's JSON shape and never
carry a traceback. No exception reaches uvicorn (`Guard`): one that did would make it close the keep-alive
connection; every failure is a JSON error on a connection that stays usable. With an API key, everything but
/health needs it (/metrics and /openapi.json included). Browsers may call it from the origins given
(`cors_origins`, CORS off by default). While the engine drains (shutdown), new requests get 503.

The middleware (guard.py), the stop-string filter (stop_strings.py), the responses' pieces (responses.py) and
/metrics' text (metrics.py) live apart; the two endpoints share their preparation and error helpers as closures
over one app.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
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
from .body import DEFAULT_MAX_REQUEST_BYTES
from .connections import DEFAULT_BODY_TIMEOUT_S
from .engine import Engine, MemoryBudgetExceeded, QueueFull, ShuttingDown
from .engine import Request as EngineRequest
from .errors import APIError, bad, shutting_down
from .guard import Guard
from .images import DEFAULT_MAX_IMAGE_PIXELS, fetch_all, image_parts, load_images, remote_parts
from .intake import Fetching, Intake
from .messages import parse_messages
from .metrics import RequestCounts, prometheus_text
from .prompt_ids import conversation_ids, least_tokens, message_texts, system_prefix
from .protocol import parse_options
from .responses import finish_reason, logprob_entry, sse, usage
from .streaming import answer, closing, framed

log = logging.getLogger("qwen35.server")


def create_app(engine: Engine, tokenizer, model_name: str, api_key: str | None = None,
               default_thinking: bool | None = None, request_timeout: float | None = 600.0,
               preserve_thinking: bool = True, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               allow_remote_images: bool = False, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               body_timeout: float = DEFAULT_BODY_TIMEOUT_S, cors_origins: list[str] | None = None) -> FastAPI:
    """body_timeout: seconds the body may take to arrive (408 past it; at most request_timeout). cors_origins:
    the browser origins allowed to call the API ("*": any); None or empty: no CORS headers."""
    # preserve_thinking: past assistant turns keep their think block (the reasoning the client sends back,
    # or an empty block), exactly as the model produced them, so turn N+1 restores the snapshot taken at the
    # end of turn N's answer. The Qwen3.6 templates and ours honour it; a template that ignores it drops past
    # think blocks, and reuse then stops at the end of turn N's user message.
    template_defaults = {"preserve_thinking": preserve_thinking}
    app = FastAPI(title="qwen35", docs_url=None, redoc_url=None, openapi_url=None)
    counts = RequestCounts()
    app.add_middleware(Guard, counts=counts)
    if cors_origins:  # outside the Guard: its 500s and every error carry the headers too; preflights end here
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "HEAD"],
                           allow_headers=["*"], max_age=600)
    started = int(time.time())
    intake = Intake(model_name, api_key, max_request_bytes, min(body_timeout, request_timeout or body_timeout),
                    lambda: engine.draining)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

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

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        if engine.draining:  # (a load balancer's cue to send requests elsewhere)
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return {"status": "ok"}

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request):
        intake.check_auth(request)
        return app.openapi()

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": started, "owned_by": "qwen35"}

    @app.get("/v1/models")
    async def models(request: Request):
        intake.check_auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")  # (an id may hold slashes: "Qwen/Qwen3.5-0.8B")
    async def model(model_id: str, request: Request):
        intake.check_auth(request)
        if model_id != model_name:
            raise APIError(404, f"the model {model_id[:100]!r} does not exist; this server serves '{model_name}'",
                           "model", "model_not_found")
        return model_card()

    @app.get("/metrics")
    async def metrics(request: Request):
        intake.check_auth(request)
        return PlainTextResponse(prometheus_text(engine, counts), media_type="text/plain; version=0.0.4")

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
        except MemoryBudgetExceeded as e:  # never fits: a 400 (a 503 is retried by clients, forever)
            raise APIError(400, f"{e} (qwen35 serve --memory-budget)", code="insufficient_memory") from None
        except ShuttingDown:
            raise shutting_down() from None

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
        except (TypeError, ValueError) as e:  # e.g. a chat_template_kwargs key that is also a render argument
            own = opts.template_kwargs.keys() - template_defaults.keys()
            raise bad("chat_template_kwargs" if own else "messages",
                      f"the chat template could not render this request ({type(e).__name__}: {e})") from None

    def prepare_chat(body: dict):
        opts = parse_options(body, tokenizer.eos_token_ids, default_thinking, chat=True,
                             default_template_kwargs=template_defaults, vocab_size=engine.model.config.vocab_size)
        messages = parse_messages(body.get("messages"))
        text_tokens = refuse_overlong(message_texts(messages), opts, "messages")
        parts = image_parts(messages)
        if parts and engine.speculation is not None:
            raise bad(parts[0][0], "image input is not available on a server started with --speculative (the MTP "
                      "head has no image positions)")
        remote = remote_parts(parts, engine.model, allow_remote_images) if parts else []
        rest = functools.partial(chat_prompt, body, opts, messages, text_tokens, parts)
        # remote images are fetched on threads of their own (intake.Fetching), then the rest runs here again
        return Fetching(lambda: fetch_all(remote, max_request_bytes), rest) if remote else rest({})

    def chat_prompt(body: dict, opts, messages: list[dict], text_tokens: int, parts: list, fetched: dict):
        pictures = []
        if parts:  # sizes from the headers first: a request over the context is refused before any decoding
            pictures = load_images(parts, engine.model, allow_remote_images, max_image_pixels, max_request_bytes,
                                   text_tokens, opts.params.max_tokens, fetched)
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
        opts, ids, boundary, thinking_open, guide, vision, prefix = await intake.prepared(request, prepare_chat)
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
            n = 0  # tokens sent, for the usage chunk

            async def events():
                # every token's logprob entry rides on the next chunk sent, so a stream carries the same
                # entries as the answer in one body (tokens whose text is held back, or is tool-call markup
                # or a control token, send no text chunk of their own)
                nonlocal n
                ncalls, cut, lp = 0, None, []
                yield chunk({"role": "assistant", "content": ""})
                async for delta, item in answer(req, request, opts, parser, tokenizer):
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

            def tail():
                return closing("chat.completion.chunk", cid, created, model_name, req, n, opts.include_usage)

            return StreamingResponse(framed(events(), tail, counts), media_type="text/event-stream")

        out, n, last, lps, cut = ParsedDelta(), 0, None, [], None
        async for delta, item in answer(req, request, opts, parser, tokenizer):
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
        opts, ids, guide = await intake.prepared(request, prepare_completion)
        req = submit(ids, opts, param="prompt", guide=guide)
        cid = "cmpl-" + uuid.uuid4().hex[:24]
        created = int(time.time())
        if opts.stream:
            n = 0

            async def events():
                nonlocal n
                cut, sent, lp = None, 0, []  # lp: tokens whose logprobs ride on the next chunk
                async for delta, item in answer(req, request, opts, None, tokenizer):
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

            def tail():
                return closing("text_completion", cid, created, model_name, req, n, opts.include_usage)

            return StreamingResponse(framed(events(), tail, counts), media_type="text/event-stream")
        text, n, last, cut, lp, sent = [], 0, None, None, [], 0
        async for delta, item in answer(req, request, opts, None, tokenizer):
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
