"""OpenAI `image_url` content parts: checked, decoded and turned into the engine's image inputs.

A part is `{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}` (a bare string for
`image_url` is taken too). `data:` URLs are decoded here; http(s) URLs are refused unless the server was
started with --allow-remote-images, because fetching makes the server a client of any address a request
names. Every failure is a 400 naming the part: malformed base64, not an image, over the pixel cap
(--max-image-pixels, checked from the header before the pixels are decoded), a checkpoint without a vision
tower.
"""

from __future__ import annotations

from typing import Any

from ..vision_input import ImageError, open_image
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


def load_images(parts: list[tuple[str, str]], model, allow_remote: bool, max_pixels: int, max_bytes: int) -> list:
    """Decoded PIL images for `parts`, or a 400 naming the part at fault."""
    if getattr(model, "visual", None) is None:
        raise bad(parts[0][0], f"'{parts[0][0]}' is an image, and this model has no vision tower (a text-only "
                  "checkpoint): send text, or serve a vision-language checkpoint")
    images = []
    for at, url in parts:
        if url.startswith(("http://", "https://")):
            if not allow_remote:
                raise bad(at, f"'{at}' is a remote URL, which this server does not fetch (start it with "
                          "--allow-remote-images); send the image inline as a data:image/...;base64 URL")
            source: Any = fetch(url, at, max_bytes)
        elif url.startswith("data:"):
            source = url
        else:
            raise bad(at, f"'{at}' must hold a data:image/...;base64 URL"
                      + (" or an http(s) URL" if allow_remote else ""))
        try:
            images.append(open_image(source, max_pixels=max_pixels))
        except ImageError as e:
            raise bad(at, f"'{at}': {e}") from None
    return images
