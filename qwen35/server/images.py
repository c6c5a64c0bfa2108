"""OpenAI `image_url` content parts: checked, decoded and turned into the engine's image inputs.

A part is `{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}` (a bare string for
`image_url` is taken too). `data:` URLs are decoded here; http(s) URLs are refused unless the server was
started with --allow-remote-images, because fetching makes the server a client of any address a request
names. Every failure is a 400 naming the part: malformed base64, not an image, over the pixel cap
(--max-image-pixels), an aspect ratio the processor refuses, a checkpoint without a vision tower.

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

from typing import Any

from ..generation import max_context
from ..vision_input import ImageError, decode, open_header
from .errors import bad

DEFAULT_MAX_IMAGE_PIXELS = 16_777_216  # 4096 x 4096: the official processor's longest_edge in pixels
REMOTE_TIMEOUT_S = 10.0


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


def fetch(url: str, at: str, max_bytes: int) -> bytes:
    """GET an http(s) image (only with --allow-remote-images), at most max_bytes."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=REMOTE_TIMEOUT_S) as r:  # http(s) only: the caller checked
            data = r.read(max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise bad(at, f"could not fetch the image at '{at}': {getattr(e, 'reason', e)}") from None
    if len(data) > max_bytes:
        raise bad(at, f"the image at '{at}' is larger than {max_bytes} bytes")
    return data


def load_images(parts: list[tuple[str, str]], model, allow_remote: bool, max_pixels: int, max_bytes: int,
                text_tokens: int = 0, max_tokens: int = 0) -> list:
    """The prepared images (multimodal.VisionInput) of `parts`, or a 400 naming the part at fault.
    text_tokens: a lower bound on the prompt's text tokens; with max_tokens and the images' tokens it must fit
    the context, which is checked from the headers before any image is decoded."""
    from ..multimodal import prepare_image

    if getattr(model, "visual", None) is None:
        raise bad(parts[0][0], f"'{parts[0][0]}' is an image, and this model has no vision tower (a text-only "
                  "checkpoint): send text, or serve a vision-language checkpoint")
    opened, image_tokens = [], 0
    for at, url in parts:
        img = open_part(at, url, allow_remote, max_pixels, max_bytes)
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


def open_part(at: str, url: str, allow_remote: bool, max_pixels: int, max_bytes: int):
    """The image of one part, its header read and checked (open_header), its pixels not decoded."""
    if url.startswith(("http://", "https://")):
        if not allow_remote:
            raise bad(at, f"'{at}' is a remote URL, which this server does not fetch (start it with "
                      "--allow-remote-images); send the image inline as a data:image/...;base64 URL")
        source: Any = fetch(url, at, max_bytes)
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
