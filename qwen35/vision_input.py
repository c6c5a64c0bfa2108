"""Images in, patches out: the checkpoint's image processor (Qwen2-VL style) on Pillow and numpy.

Steps, each as the reference processor does them (so pixel values are equal, not merely close):
1. decode with Pillow and convert to RGB, compositing transparency onto white (RGBA, LA, palette with a
   transparent index); grayscale is replicated to three channels;
2. `smart_resize`: both sides rounded to multiples of patch_size x merge_size (32 for Qwen3.5), scaled down
   to at most max_pixels or up to at least min_pixels keeping the aspect ratio; resized bicubic by Pillow
   on the 8-bit image;
3. rescale by 1/255 (in float64, then float32), normalize with the processor's mean/std (float32);
4. a still image is repeated temporal_patch_size times (the tower's patches span two frames) and cut into
   patches ordered merge block by merge block, each flattened as [channel, frame, row, column].

Sizes come from `preprocessor_config.json` when the checkpoint has one (`size.shortest_edge` /
`size.longest_edge`, or the older `min_pixels` / `max_pixels`), else the Qwen3.5 defaults.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .errors import Qwen35Error

# Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS) is one process-wide global with no per-call form;
# open_image reads headers under this lock so that lifting it for a moment (to learn a refused image's size) can
# never race another open_image nor leave it lifted
_PILLOW_LIMIT = threading.Lock()

DEFAULT_MIN_PIXELS = 65536  # Qwen3.5's preprocessor_config.json: size.shortest_edge
DEFAULT_MAX_PIXELS = 16777216  # size.longest_edge
MAX_ASPECT_RATIO = 200


class ImageError(Qwen35Error, ValueError):
    """An image that cannot be used: unreadable, not an image, too large, or given to a text-only model."""


@dataclass(frozen=True)
class ImageProcessor:
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255

    @classmethod
    def from_model_dir(cls, path: str | Path | None, vision=None) -> ImageProcessor:
        """The checkpoint's preprocessor_config.json, falling back to the tower's patch sizes (`vision`, a
        VisionConfig) and the Qwen3.5 defaults for whatever it does not say."""
        base = cls() if vision is None else cls(patch_size=vision.patch_size,
                                                 temporal_patch_size=vision.temporal_patch_size,
                                                 merge_size=vision.spatial_merge_size)
        f = None if path is None else Path(path) / "preprocessor_config.json"
        if f is None or not f.is_file():
            return base
        try:
            cfg = json.loads(f.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ImageError(f"{f}: not valid JSON ({e})") from None
        size = cfg.get("size") or {}
        changes = {k: cfg[k] for k in ("patch_size", "temporal_patch_size", "merge_size") if cfg.get(k)}
        lo = size.get("shortest_edge", cfg.get("min_pixels"))
        hi = size.get("longest_edge", cfg.get("max_pixels"))
        if lo is not None:
            changes["min_pixels"] = int(lo)
        if hi is not None:
            changes["max_pixels"] = int(hi)
        for k in ("image_mean", "image_std"):
            if cfg.get(k) is not None:
                changes[k] = tuple(float(v) for v in cfg[k])
        if cfg.get("rescale_factor") is not None:
            changes["rescale_factor"] = float(cfg["rescale_factor"])
        return replace(base, **changes)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) the image is resized to (smart_resize)."""
        if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
            raise ImageError(f"image of {width}x{height} has an aspect ratio above {MAX_ASPECT_RATIO}")
        f = self.factor
        h, w = round(height / f) * f, round(width / f) * f
        if h * w > self.max_pixels:
            beta = math.sqrt(height * width / self.max_pixels)
            h = max(f, math.floor(height / beta / f) * f)
            w = max(f, math.floor(width / beta / f) * f)
        elif h * w < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h = math.ceil(height * beta / f) * f
            w = math.ceil(width * beta / f) * f
        return h, w

    def num_tokens(self, height: int, width: int) -> int:
        """Placeholder tokens an image of this size takes in the prompt."""
        h, w = self.resized_size(height, width)
        return (h // self.patch_size) * (w // self.patch_size) // self.merge_size**2

    def frames_to_patches(self, frames: np.ndarray) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """frames [F, H, W, 3] uint8 (already resized; F a multiple of temporal_patch_size) ->
        (patches [t*h*w, 3*T*P*P] fp32, grid (t, h, w))."""
        x = frames.astype(np.float64) * self.rescale_factor
        x = x.astype(np.float32)
        x = (x - np.array(self.image_mean, dtype=np.float32)) / np.array(self.image_std, dtype=np.float32)
        F_, H, W, C = x.shape
        T, P, m = self.temporal_patch_size, self.patch_size, self.merge_size
        t, h, w = F_ // T, H // P, W // P
        x = x.reshape(t, T, h // m, m, P, w // m, m, P, C)
        # -> (t, block row, block col, row in block, col in block, channel, frame, pixel row, pixel col)
        x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
        return torch.from_numpy(np.ascontiguousarray(x).reshape(t * h * w, C * T * P * P)), (t, h, w)

    def preprocess(self, image) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """One image (a PIL image, path, bytes or data: URL) -> (patches, grid (1, h, w))."""
        rgb = to_rgb(open_image(image))
        h, w = self.resized_size(rgb.height, rgb.width)
        from PIL import Image

        arr = np.asarray(rgb.resize((w, h), resample=Image.Resampling.BICUBIC))
        return self.frames_to_patches(np.repeat(arr[None], self.temporal_patch_size, axis=0))


def to_rgb(img):
    """RGB, with any transparency composited onto white (as the reference processor does)."""
    from PIL import Image

    if "A" in img.getbands() or img.info.get("transparency") is not None:
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img.convert("RGB")


def decode_data_url(url: str) -> bytes:
    """The bytes of a `data:[<mime>][;base64],<data>` URL (base64 only: images are binary)."""
    head, sep, data = url.partition(",")
    if not sep or not head.startswith("data:"):
        raise ImageError("a data URL must look like data:image/png;base64,<data>")
    if not head.endswith(";base64"):
        raise ImageError("data URL images must be base64 encoded (data:image/...;base64,...)")
    try:
        return base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("the image's data URL holds malformed base64") from None


def open_image(source, max_pixels: int | None = None):
    """A decoded PIL image from a PIL image, a path, raw bytes or a data: URL. max_pixels: refuse larger
    inputs (width x height as stored) before decoding them."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:  # pragma: no cover - Pillow is a dependency
        raise ImageError("image input needs Pillow (pip install Pillow)") from None
    if isinstance(source, Image.Image):
        img = source
    else:
        if isinstance(source, str) and source.startswith("data:"):
            source = decode_data_url(source)
        if isinstance(source, (bytes, bytearray)):
            fp, name = io.BytesIO(source), "the image data"
        else:
            p = Path(source).expanduser()
            if not p.is_file():
                raise ImageError(f"image not found: {p}")
            fp, name = p, str(p)
        try:
            img = _open_within_limit(Image, fp, name, max_pixels)
        except UnidentifiedImageError:
            raise ImageError(f"{name} is not an image Pillow can read (PNG, JPEG, WebP, GIF, BMP, ...)") from None
        except OSError as e:
            raise ImageError(f"{name}: cannot read image ({e})") from None
    if max_pixels is not None and img.width * img.height > max_pixels:
        raise _over_limit(img.width, img.height, max_pixels)
    try:
        img.load()
    except (OSError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # a GIF frame past the limit
        raise ImageError(f"cannot decode image: {e}") from None
    if img.width < 1 or img.height < 1:
        raise ImageError("the image is empty (0 pixels)")
    return img


def _over_limit(width: int, height: int, limit: int, whose: str = "") -> ImageError:
    return ImageError(f"image of {width}x{height} = {width * height} pixels is over the limit of {limit} pixels{whose}")


def _open_within_limit(Image, fp, name: str, max_pixels: int | None):
    """Image.open (the header only; no pixels are decoded) with Pillow's decompression-bomb refusal turned into
    the same ImageError as max_pixels. Pillow refuses a header over 2 x MAX_IMAGE_PIXELS inside Image.open
    (DecompressionBombError, not an OSError) and warns over 1 x (an exception where warnings are errors), both
    before the caller learns the size: the header is read again with the limit lifted, to name it."""
    with _PILLOW_LIMIT:
        try:
            return Image.open(fp)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            saved = Image.MAX_IMAGE_PIXELS
            pillow_limit = saved * (2 if isinstance(e, Image.DecompressionBombError) else 1)
            Image.MAX_IMAGE_PIXELS = None
            try:
                with Image.open(fp) as img:
                    width, height = img.size
            except OSError:  # unreadable without the limit too (cannot happen: it read to the size): say so
                raise ImageError(f"{name}: {e}") from None
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    if max_pixels is not None and width * height > max_pixels:
        raise _over_limit(width, height, max_pixels)
    raise _over_limit(width, height, pillow_limit, " (Pillow's decompression-bomb limit)")


def image_hash(image) -> str:
    """A content key for prompt reuse: sha256 of the RGB pixels and size (the same picture sent as PNG or as
    a re-encoded PNG is the same key)."""
    rgb = to_rgb(open_image(image))
    h = hashlib.sha256(f"{rgb.width}x{rgb.height}".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()
