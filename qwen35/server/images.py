"""OpenAI `image_url` content parts: checked, decoded and turned into the engine's image inputs.

A part is `{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}` (a bare string for
`image_url` is taken too). `data:` URLs are decoded here; http(s) URLs are refused unless the server was
started with --allow-remote-images, because fetching makes the server a client of any address a request
names. A request's fetches share one deadline (REMOTE_DEADLINE_S: a server trickling a byte every few seconds
never trips a per-read timeout) and run apart from text-only requests' preparation (the app's fetch threads).
Every failure is a 400 naming the part: malformed base64, not an image, over the pixel cap
(--max-image-pixels), an aspect ratio the processor refuses, a checkpoint without a vision tower, a fetch that
failed or did not finish in time.

Memory: a 60 KB PNG of one colour decodes to 48 MiB at 4096x4096 and its fp32 patches take 8 times that, so an
8 MiB body could ask for tens of GiB. Every part's header is therefore read first (Pillow does not decode the
pixels to learn the size): the pixel cap, the aspect ratio, and the tokens all the images take together with
the text's lower bound and max_tokens against the context are checked before any image is decoded, and a
request that cannot run is refused within milliseconds (context_length_exceeded, as a long text prompt is).
Then the images are decoded one at a time, each reduced to its resized 8-bit pixels before the next
(multimodal.prepare_image; patches are made only at prefill). There is no separate per-request pixel budget:
what is held is bounded by the context (the token check), what is decoded at once by one image under the cap.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from ..generation import max_context
from ..vision_input import ImageError, decode, open_header
from .errors import bad

DEFAULT_MAX_IMAGE_PIXELS = 16_777_216  # 4096 x 4096: the official processor's longest_edge in pixels
REMOTE_TIMEOUT_S = 10.0  # one connect or read
REMOTE_DEADLINE_S = 30.0  # all of one request's fetches together, from the first connect to the last byte


def image_url_of(part: dict, at: str) -> str:
    """The URL of an image_url part, or a 400 naming it."""
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise bad(at, f"'{at}' must be {{\"type\": \"image_url\", \"image_url\": {{\"url\": \"data:image/...;base64,"
                  "...\"}}")
    return url


def image_parts(messages: list[dict]) -> list[tuple[str, str]]:
    """(parameter path, URL) of every image part, in the order the chat template writes their placeholders."""
    out = []
    for i, m in enumerate(messages):
        content = m.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") == "image_url":
                    out.append((f"messages[{i}].content[{j}]", image_url_of(part, f"messages[{i}].content[{j}]")))
    return out


def remote_parts(parts: list[tuple[str, str]], model, allow_remote: bool) -> list[tuple[str, str]]:
    """The http(s) parts among `parts`, to fetch (fetch_all) before load_images; a 400 for the first one on a
    server that does not fetch, or for any image on a checkpoint without a vision tower (nothing is fetched)."""
    refuse_without_vision(model, parts)
    remote = [(at, url) for at, url in parts if url.startswith(("http://", "https://"))]
    if remote and not allow_remote:
        raise bad(remote[0][0], f"'{remote[0][0]}' is a remote URL, which this server does not fetch (start it with "
                  "--allow-remote-images); send the image inline as a data:image/...;base64 URL")
    return remote


def fetch_all(parts: list[tuple[str, str]], max_bytes: int, deadline_s: float | None = None) -> dict[str, bytes]:
    """{part: its bytes} for http(s) `parts`, fetched one after another within one deadline (REMOTE_DEADLINE_S)."""
    deadline = time.monotonic() + (REMOTE_DEADLINE_S if deadline_s is None else deadline_s)
    return {at: fetch(url, at, max_bytes, deadline) for at, url in parts}


def fetch(url: str, at: str, max_bytes: int, deadline: float | None = None) -> bytes:
    """GET an http(s) image (only with --allow-remote-images), at most max_bytes, by `deadline` (time.monotonic();
    default REMOTE_DEADLINE_S from now). At the deadline a timer shuts the connection's socket, which ends
    whatever read is under way (headers or body; the name lookup before connecting is the system's)."""
    import urllib.error

    deadline = time.monotonic() + REMOTE_DEADLINE_S if deadline is None else deadline
    socks: list[socket.socket] = []
    timer = threading.Timer(max(0.0, deadline - time.monotonic()), _cut, (socks,))
    timer.daemon = True
    timer.start()
    opener, timeout = _opener(socks, deadline), min(REMOTE_TIMEOUT_S, max(0.01, deadline - time.monotonic()))
    try:
        with opener.open(url, timeout=timeout) as r:  # http(s) only: the caller checked
            data = r.read(max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        if time.monotonic() >= deadline:
            raise _late(at) from None
        raise bad(at, f"could not fetch the image at '{at}': {getattr(e, 'reason', e)}") from None
    finally:
        timer.cancel()
    if time.monotonic() >= deadline:  # cut short by the timer: a partial image is no image
        raise _late(at)
    if len(data) > max_bytes:
        raise bad(at, f"the image at '{at}' is larger than {max_bytes} bytes")
    return data


def _late(at: str):
    return bad(at, f"fetching the image at '{at}' did not finish within {REMOTE_DEADLINE_S:g} s (a request's remote "
               "images together); send it inline as a data:image/...;base64 URL")


def _cut(socks: list) -> None:
    for s in list(socks):
        try:
            socket.socket.shutdown(s, socket.SHUT_RDWR)  # (the plain socket's: an SSL one would unwrap first)
        except OSError:
            pass


def _opener(socks: list, deadline: float):
    """urllib's opener (proxies, redirects, TLS as usual) whose connections put their sockets in `socks` (a
    redirect's too), so the deadline's timer can shut them."""
    import http.client
    import urllib.request

    def keep(conn):
        socks.append(conn.sock)
        if time.monotonic() >= deadline:  # connected after the timer went off
            _cut([conn.sock])

    class HTTP(http.client.HTTPConnection):
        def connect(self):
            super().connect()
            keep(self)

    class HTTPS(http.client.HTTPSConnection):
        def connect(self):
            super().connect()
            keep(self)

    class HTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(HTTP, req)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(HTTPS, req, context=self._context)

    return urllib.request.build_opener(HTTPHandler, HTTPSHandler)


def refuse_without_vision(model, parts: list[tuple[str, str]]) -> None:
    if getattr(model, "visual", None) is None:
        raise bad(parts[0][0], f"'{parts[0][0]}' is an image, and this model has no vision tower (a text-only "
                  "checkpoint): send text, or serve a vision-language checkpoint")


def load_images(parts: list[tuple[str, str]], model, allow_remote: bool, max_pixels: int, max_bytes: int,
                text_tokens: int = 0, max_tokens: int = 0, fetched: dict[str, bytes] | None = None) -> list:
    """The prepared images (multimodal.VisionInput) of `parts`, or a 400 naming the part at fault.
    text_tokens: a lower bound on the prompt's text tokens; with max_tokens and the images' tokens it must fit
    the context, which is checked from the headers before any image is decoded. fetched: remote parts' bytes
    already fetched (fetch_all); a remote part not in it is fetched here."""
    from ..multimodal import prepare_image

    refuse_without_vision(model, parts)
    opened, image_tokens = [], 0
    for at, url in parts:
        img = open_part(at, url, allow_remote, max_pixels, max_bytes, (fetched or {}).get(at))
        try:
            image_tokens += model.visual.processor.num_tokens(img.height, img.width)
        except ImageError as e:  # an aspect ratio the processor refuses
            raise bad(at, f"'{at}': {e}") from None
        opened.append((at, img))
    refuse_over_context(model, text_tokens, image_tokens, len(parts), max_tokens)
    out = []
    while opened:  # popped, so each decoded image is let go before the next is decoded
        at, img = opened.pop(0)
        try:
            out.append(prepare_image(model, decode(img)))
        except ImageError as e:
            raise bad(at, f"'{at}': {e}") from None
    return out


def open_part(at: str, url: str, allow_remote: bool, max_pixels: int, max_bytes: int, fetched: bytes | None = None):
    """The image of one part, its header read and checked (open_header), its pixels not decoded."""
    if url.startswith(("http://", "https://")):
        if not allow_remote:
            raise bad(at, f"'{at}' is a remote URL, which this server does not fetch (start it with "
                      "--allow-remote-images); send the image inline as a data:image/...;base64 URL")
        source: Any = fetched if fetched is not None else fetch(url, at, max_bytes)
    elif url.startswith("data:"):
        source = url
    else:
        raise bad(at, f"'{at}' must hold a data:image/...;base64 URL" + (" or an http(s) URL" if allow_remote else ""))
    try:
        return open_header(source, max_pixels=max_pixels)
    except ImageError as e:
        raise bad(at, f"'{at}': {e}") from None


def refuse_over_context(model, text_tokens: int, image_tokens: int, num_images: int, max_tokens: int) -> None:
    """A 400 context_length_exceeded, worded as the server's check of a long text prompt, where the images'
    tokens, the text's lower bound and max_tokens cannot fit the context."""
    least, limit = text_tokens + image_tokens, max_context(model)
    if least + max_tokens > limit:
        raise bad("messages", f"the prompt holds at least {least} tokens ({image_tokens} of them for its {num_images} "
                  f"image(s)); with max_tokens ({max_tokens}) that exceeds the context of {limit} tokens; send fewer "
                  "or smaller images, shorten the prompt or lower max_tokens", "context_length_exceeded")
