"""Images in, patches out: the checkpoint's image processor (Qwen2-VL style) on Pillow and numpy.

Steps, each as the reference processor does them (so pixel values are equal, not merely close):
1. decode with Pillow and convert to RGB, compositing transparency onto white (RGBA, LA, palette with a
   transparent index); grayscale is replicated to three channels. Where the reference loses the picture we
   do not follow it: a file's EXIF orientation is applied (as transformers' load_image does for paths and
   URLs), grayscale of more than 8 bits (16-bit, 32-bit integer, float) is scaled to 8 bits instead of
   clipped to white (`to_8bit`), and premultiplied alpha (La, RGBa) is unpremultiplied before compositing;
2. `smart_resize`: both sides rounded to multiples of patch_size x merge_size (32 for Qwen3.5), scaled down
   to at most max_pixels or up to at least min_pixels keeping the aspect ratio; resized bicubic by Pillow
   on the 8-bit image;
3. rescale by 1/255 (in float64, then float32), normalize with the processor's mean/std (float32);
4. a still image is repeated temporal_patch_size times (the tower's patches span two frames) and cut into
   patches ordered merge block by merge block, each flattened as [channel, frame, row, column].

Decoding is split in two (`open_header`, `decode`) because Pillow reads a file's header without its pixels:
a server learns every image's size, and so its token count, before it decodes any of them.

Sizes come from `preprocessor_config.json` when the checkpoint has one (`size.shortest_edge` /
`size.longest_edge`, or the older `min_pixels` / `max_pixels`), else the Qwen3.5 defaults; a video's from
`video_preprocessor_config.json` (video_input.VideoProcessor, the processor's `video`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
import os
import re
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .errors import Qwen35Error

if TYPE_CHECKING:
    from .video_input import VideoProcessor

# Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS) is one process-wide global with no per-call form;
# open_image reads headers under this lock so that lifting it for a moment (to learn a refused image's size) can
# never race another open_image nor leave it lifted
_PILLOW_LIMIT = threading.Lock()

EXIF_ORIENTATION = 0x0112  # the EXIF tag a camera records its rotation in (1: upright)
# how the common formats' base64 begins (PNG, JPEG, GIF, WebP, BMP, TIFF): a path that starts so is pasted image data
BASE64_MAGIC = ("iVBORw0KGgo", "/9j/", "R0lGOD", "UklGR", "Qk", "SUkq", "TU0A")

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
    video: VideoProcessor | None = None  # video_preprocessor_config.json's settings; None: the video defaults

    @classmethod
    def from_model_dir(cls, path: str | Path | None, vision=None) -> ImageProcessor:
        """The checkpoint's preprocessor_config.json, falling back to the tower's patch sizes (`vision`, a
        VisionConfig) and the Qwen3.5 defaults for whatever it does not say; its video_preprocessor_config.json,
        where it has one, as `video`."""
        base = cls() if vision is None else cls(patch_size=vision.patch_size,
                                                 temporal_patch_size=vision.temporal_patch_size,
                                                 merge_size=vision.spatial_merge_size)
        f = None if path is None else Path(path) / "preprocessor_config.json"
        if f is None or not f.is_file():
            return base if path is None else base.with_video(path)
        cfg = read_config(f)
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
        return replace(base, **changes).with_video(path)

    def with_video(self, path: str | Path) -> ImageProcessor:
        """This processor with the checkpoint's video_preprocessor_config.json as `video` (where it has one)."""
        from .video_input import VideoProcessor  # video_input builds on this module

        return replace(self, video=VideoProcessor.from_model_dir(path, self))

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

    def resize(self, rgb) -> np.ndarray:
        """An RGB PIL image -> its pixels at resized_size, [h, w, 3] uint8 (bicubic on the 8-bit image)."""
        from PIL import Image

        h, w = self.resized_size(rgb.height, rgb.width)
        return np.asarray(rgb.resize((w, h), resample=Image.Resampling.BICUBIC))

    def image_patches(self, pixels: np.ndarray) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Resized pixels [h, w, 3] uint8 (`resize`) -> (patches, grid (1, h/P, w/P)): the still image
        repeated over the temporal patch."""
        return self.frames_to_patches(np.repeat(pixels[None], self.temporal_patch_size, axis=0))

    def preprocess(self, image) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """One image (a PIL image, path, bytes or data: URL) -> (patches, grid (1, h, w))."""
        return self.image_patches(self.resize(to_rgb(open_image(image))))


def read_config(f: Path) -> dict:
    """A processor config file's JSON object (the image's and the video's)."""
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ImageError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ImageError(f"{f}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def to_rgb(img):
    """RGB, with any transparency composited onto white (as the reference processor does). Grayscale of more
    than 8 bits is brought to 8 bits first (to_8bit); premultiplied alpha (La, RGBa, whose lowercase `a` is
    no "A" band) is unpremultiplied to LA / RGBA, which Pillow converts from."""
    from PIL import Image

    if img.mode.startswith("I") or img.mode == "F":
        img = to_8bit(img)
    elif img.mode in ("La", "RGBa"):
        img = img.convert(img.mode.upper())
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img.convert("RGB")


def to_8bit(img):
    """A grayscale image of more than 8 bits as 8-bit L (LA where it has a transparent value): Pillow's own
    convert clips every value above 255 to white, so a 16-bit scan or depth map would arrive blank.
    - I;16 (16-bit PNG and TIFF): the top byte of each value;
    - I (32-bit integers): read as 16-bit like I;16, values clipped to 0..65535 (Pillow uses this mode for
      16-bit data too); a fixed scale, not the image's own range, so equal values stay equal across images;
    - F (float): 0..1 where no value exceeds 1 (the usual normalized array), else 0..255; clipped, NaN as 0."""
    from PIL import Image

    arr = np.asarray(img)
    if img.mode == "F":
        x = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if x.max() <= 1:
            x = x * 255
        out = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    else:
        out = (np.clip(arr.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
    gray = Image.fromarray(out)
    transparent = img.info.get("transparency")
    if isinstance(transparent, int):  # a PNG's tRNS: the one value, in the original depth, that is see-through
        alpha = Image.fromarray(np.where(arr == transparent, 0, 255).astype(np.uint8))
        return Image.merge("LA", (gray, alpha))
    return gray


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
        pass
    # base64 wrapped at 76 columns (base64.encodebytes, openssl, MIME) is still base64: drop the line breaks and
    # spaces (ASCII whitespace only) and try once more; only the uncommon wrapped form pays for the copy
    compact = data.translate(_ASCII_SPACE)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        pass
    # the URL-safe alphabet (RFC 4648 section 5: '-' and '_' for '+' and '/'; JavaScript's and JWT encoders
    # write it, often without the '=' padding) names the same bytes; one alphabet per string, never a mix
    if ("-" in compact or "_" in compact) and "+" not in compact and "/" not in compact:
        try:
            return base64.b64decode(compact + "=" * (-len(compact) % 4), altchars=b"-_", validate=True)
        except (binascii.Error, ValueError):
            pass
    raise ImageError("the image's data URL holds malformed base64")


_ASCII_SPACE = dict.fromkeys(map(ord, " \t\n\r\f\v"))


def open_image(source, max_pixels: int | None = None):
    """A decoded PIL image from a PIL image, a path, raw bytes or a data: URL. max_pixels: refuse larger
    inputs (width x height as stored) before decoding them. A file's EXIF orientation is applied."""
    img = open_header(source, max_pixels)
    return decode(img, upright=img is not source)


def open_header(source, max_pixels: int | None = None):
    """`source` (a PIL image, a path, raw bytes or a data: URL) as a PIL image whose size is known and checked
    (not empty, at most max_pixels as stored) but whose pixels are not decoded yet: Pillow reads the header
    only. `decode` reads the pixels. A PIL image is returned as it is."""
    Image = _pillow()
    if isinstance(source, Image.Image):
        img = source
    else:
        fp, name = _readable(source)
        try:
            img = _open_within_limit(Image, fp, name, max_pixels)
        except Image.UnidentifiedImageError:
            raise ImageError(f"{name} is not an image Pillow can read (PNG, JPEG, WebP, GIF, BMP, ...)") from None
        except OSError as e:
            raise ImageError(f"{name}: cannot read image ({e})") from None
    if max_pixels is not None and img.width * img.height > max_pixels:
        raise _over_limit(img.width, img.height, max_pixels)
    if img.width < 1 or img.height < 1:
        raise ImageError("the image is empty (0 pixels)")
    return img


def decode(img, upright: bool = True):
    """The image from `open_header` with its pixels decoded. upright: turn it as its EXIF orientation says
    (a phone's portrait photo is stored landscape with a rotation tag), as viewers and transformers' load_image
    do; a PIL image the caller built is taken as it is (upright=False)."""
    Image = _pillow()
    try:
        img.load()
    # a GIF frame past the limit; Pillow's decoders also raise ValueError, SyntaxError or EOFError on corrupt data
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise ImageError(f"cannot decode image: {e}") from None
    return _upright(img) if upright else img


def _upright(img):
    """img turned by its EXIF orientation, or img itself where it has none (or an unreadable one, which a
    viewer ignores too). Animated images are left alone: exif_transpose would keep only the first frame."""
    from PIL import ImageOps

    if getattr(img, "n_frames", 1) != 1:
        return img
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except (OSError, ValueError, SyntaxError):
        return img
    return ImageOps.exif_transpose(img) if orientation in range(2, 9) else img


def _pillow():
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        raise ImageError("image input needs Pillow (pip install Pillow)") from None
    return Image


def _readable(source) -> tuple[object, str]:
    """(what Image.open reads, the name messages give it) for a path, raw bytes or a data: URL."""
    if isinstance(source, str) and source.startswith("data:"):
        source = decode_data_url(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(source), "the image data"
    if not isinstance(source, (str, os.PathLike)):
        raise ImageError(f"an image must be a PIL image, a file path, bytes or a data: URL, not "
                         f"{type(source).__name__}")
    shown = _shorten(str(source))
    try:
        p = Path(source).expanduser()
        found = p.is_file()
    # a string too long for a file name (ENAMETOOLONG), a NUL byte, no home directory for "~"
    except (OSError, ValueError, RuntimeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ImageError(f"cannot use '{shown}' as an image path ({reason}){_base64_hint(source)}") from None
    if not found:
        what = "is a directory, not an image file" if p.is_dir() else "not found"
        raise ImageError(f"image {what}: {_shorten(str(p))}{_base64_hint(source)}")
    return p, str(p)


def _shorten(text: str, limit: int = 300, keep: int = 60) -> str:
    """text, or its start where it is longer than a path one would type (a pasted image must not fill the
    message)."""
    return text if len(text) <= limit else f"{text[:keep]}... ({len(text)} characters)"


def _base64_hint(source) -> str:
    """A hint for a path that is really base64 image data pasted without its data: prefix."""
    text = str(source).strip()
    if len(text) < 16 or not text.startswith(BASE64_MAGIC) or not re.fullmatch(r"[A-Za-z0-9+/=\s]+", text):
        return ""
    return "; this looks like base64 image data: give it as a data URL, data:image/png;base64,<data>"


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
    return pixels_hash(to_rgb(open_image(image)))


def pixels_hash(rgb) -> str:
    """image_hash of an image already in RGB."""
    h = hashlib.sha256(f"{rgb.width}x{rgb.height}".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()
