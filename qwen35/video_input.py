"""Video in: frames sampled, resized and cut into the tower's patches, with each frame pair's timestamp.

What a video can be, without a new dependency: a list of frames (PIL images, paths, bytes) with the rate they
were taken at, or an animated GIF / WebP / PNG file that Pillow decodes (its frame durations give the rate).
Decoding MP4 would need PyAV or OpenCV (tens of MB); extract frames with ffmpeg and pass them as a list.

The rules are the Qwen3-VL video processor's (transformers `Qwen3VLVideoProcessor`, which Qwen3.5 uses):
- sampling: round(linspace(0, n - 1, k)) with k = int(n / source_fps * fps) clamped to [min_frames,
  max_frames] and to n;
- one size for every frame: sides rounded to multiples of patch x merge (32), the whole clip (frames x
  pixels) scaled into [size.shortest_edge, size.longest_edge] pixels; the frame count padded to a multiple of
  the temporal patch (2) by repeating the last frame; normalized like images;
- each pair of frames is one temporal patch, announced in the prompt as `<{t:.1f} seconds>` (the mean time of
  its two frames) before its own `<|vision_start|><|video_pad|>...<|vision_end|>`.
The numbers come from the checkpoint's video_preprocessor_config.json (`VideoProcessor.from_model_dir`, the keys
the reference reads: public Qwen3-VL configs set the clip budget to 4096 .. 25165824 pixels, unverified for Qwen3.5), else the reference's class
defaults: fps 2, 4..768 frames, 128*32*32 .. 768*32*32 pixels; patch sizes and normalization as images'.
An animated file's frames are converted and kept only where sampled (`AnimatedFrames`): the others are
decoded once, for their durations, and dropped.
The reference resizes with torchvision (not installable beside torch 2.13 here); ours resizes with Pillow
bicubic, so pixel values can differ from it in the last bits: the model is checked on identical pixel values.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .vision_input import ImageError, ImageProcessor, decode, image_hash, open_image, read_config, to_rgb

FPS = 2.0  # frames sampled per second of video
MIN_FRAMES, MAX_FRAMES = 4, 768
# the whole clip's pixels (frames x height x width), in units of factor^2 = (patch x merge)^2: the reference's
# 128*32*32 .. 768*32*32 at the official 16 px patches, the same token budget for a tower of other patches
MIN_UNITS, MAX_UNITS = 128, 768
MAX_VIDEO_TOKENS = 768  # the per-frame cap's ceiling (cap_pixels_per_frame), in units of factor^2
CONFIG = "video_preprocessor_config.json"


@dataclass(frozen=True)
class VideoProcessor:
    """How a clip is sampled, sized and cut into patches: the checkpoint's video_preprocessor_config.json as the
    reference reads it. `frames` patches and normalizes the resized frames (the image processor with the
    file's patch sizes, mean, std and rescale factor). Pixel budgets are the whole clip's (frames x height x
    width); None: MIN_UNITS / MAX_UNITS x factor^2. fps None: `num_frames` frames, or every frame."""

    frames: ImageProcessor = field(default_factory=ImageProcessor)
    fps: float | None = FPS
    num_frames: int | None = None
    min_frames: int = MIN_FRAMES
    max_frames: int = MAX_FRAMES
    min_pixels: int | None = None
    max_pixels: int | None = None
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = MAX_VIDEO_TOKENS

    @classmethod
    def of(cls, processor: ImageProcessor | VideoProcessor) -> VideoProcessor:
        """The video settings that go with `processor`: its checkpoint's, else the defaults on its patch sizes."""
        if isinstance(processor, VideoProcessor):
            return processor
        return getattr(processor, "video", None) or cls(frames=processor)

    @classmethod
    def from_model_dir(cls, path: str | Path, image: ImageProcessor) -> VideoProcessor | None:
        """The checkpoint's video_preprocessor_config.json (None where it has none); what it does not say
        comes from the reference's defaults, and the patch sizes and normalization from `image`."""
        f = Path(path) / CONFIG
        if not f.is_file():
            return None
        cfg = read_config(f)
        frames = {k: _count(cfg, k, f) for k in ("patch_size", "temporal_patch_size", "merge_size")}
        frames |= {k: _channels(cfg, k, f) for k in ("image_mean", "image_std")}
        frames["rescale_factor"] = _positive(cfg, "rescale_factor", f)
        if frames["image_std"] is not None and 0 in frames["image_std"]:
            raise ImageError(f"{f}: 'image_std' must not hold 0, got {cfg['image_std']!r}")
        out = cls(frames=replace(image, video=None, **{k: v for k, v in frames.items() if v is not None}),
                  fps=_positive(cfg, "fps", f) if "fps" in cfg else FPS, num_frames=_count(cfg, "num_frames", f),
                  min_frames=_count(cfg, "min_frames", f) or MIN_FRAMES,
                  max_frames=_count(cfg, "max_frames", f) or MAX_FRAMES,
                  cap_pixels_per_frame=_flag(cfg, "cap_pixels_per_frame", f),
                  max_video_tokens=_count(cfg, "max_video_tokens", f) or MAX_VIDEO_TOKENS,
                  **_clip_pixels(cfg, f))
        if out.min_frames > out.max_frames:
            raise ImageError(f"{f}: 'min_frames' ({out.min_frames}) is above 'max_frames' ({out.max_frames})")
        if out.fps is not None and out.num_frames is not None:  # the reference refuses both at its first video
            raise ImageError(f"{f}: 'fps' and 'num_frames' both set; they are exclusive (set 'fps' to null)")
        return out

    def sample_indices(self, total: int, source_fps: float | None) -> list[int]:
        return sample_indices(total, source_fps, self.fps, self.min_frames, self.max_frames, self.num_frames)

    def pixel_budget(self, num_frames: int) -> tuple[int, int]:
        """(min, max) pixels of a clip of num_frames sampled frames. With cap_pixels_per_frame (qwen-vl-utils'
        rule) the max is per frame: at most max_video_tokens x factor^2 or the budget's share, at least 1.05 x
        the min."""
        f2 = self.frames.factor**2
        lo = MIN_UNITS * f2 if self.min_pixels is None else self.min_pixels
        hi = MAX_UNITS * f2 if self.max_pixels is None else self.max_pixels
        if self.cap_pixels_per_frame:
            hi = max(min(self.max_video_tokens * f2, hi // num_frames), int(lo * 1.05)) * num_frames
        return lo, hi

    def resized_size(self, num_frames: int, height: int, width: int) -> tuple[int, int]:
        lo, hi = self.pixel_budget(num_frames)
        return resized_size(num_frames, height, width, self.frames.factor, self.frames.temporal_patch_size, lo, hi)


def _bad(f: Path, key: str, what: str, value) -> ImageError:
    return ImageError(f"{f}: '{key}' must be {what}, got {value!r}")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive(cfg: dict, key: str, f: Path) -> float | None:
    """cfg[key], a positive number, or None where it is absent or null."""
    v = cfg.get(key)
    if v is not None and not (_is_number(v) and v > 0):
        raise _bad(f, key, "a positive number", v)
    return v


def _count(cfg: dict, key: str, f: Path, name: str | None = None) -> int | None:
    """cfg[key], a positive integer, or None where it is absent or null. name: the key as messages give it."""
    v = cfg.get(key)
    if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
        raise _bad(f, name or key, "a positive integer", v)
    return v


def _flag(cfg: dict, key: str, f: Path) -> bool:
    """cfg[key], true or false (null: false, as the reference takes it)."""
    v = cfg.get(key)
    if v is not None and not isinstance(v, bool):
        raise _bad(f, key, "true, false or null", v)
    return bool(v)


def _channels(cfg: dict, key: str, f: Path) -> tuple[float, float, float] | None:
    """cfg[key], one number per RGB channel (a single number is every channel's), or None."""
    v = cfg.get(key)
    if v is None:
        return None
    if _is_number(v):
        return (float(v),) * 3
    if not (isinstance(v, list) and len(v) == 3 and all(map(_is_number, v))):
        raise _bad(f, key, "a list of 3 numbers (R, G, B)", v)
    return tuple(float(x) for x in v)


def _clip_pixels(cfg: dict, f: Path) -> dict:
    """min_pixels / max_pixels from `size` ({"shortest_edge": min, "longest_edge": max}: the reference reads both
    as the whole clip's pixels and fails without either; the older top-level min_pixels / max_pixels are not
    read by it, so not here either)."""
    size = cfg.get("size")
    if size is None:
        return {}
    if not isinstance(size, dict) or "shortest_edge" not in size or "longest_edge" not in size:
        raise _bad(f, "size", 'an object with "shortest_edge" and "longest_edge" (the clip\'s pixels)', size)
    lo, hi = (_count(size, k, f, f"size.{k}") for k in ("shortest_edge", "longest_edge"))
    if lo is None or hi is None:
        raise _bad(f, "size", "positive shortest_edge and longest_edge", size)
    if lo > hi:
        raise ImageError(f"{f}: 'size' has shortest_edge {lo} above longest_edge {hi}")
    return {"min_pixels": lo, "max_pixels": hi}


@dataclass
class Video:
    """Frames (PIL images, paths or bytes, or an AnimatedFrames) taken at `fps` frames per second (None: 24,
    the reference's default when a rate is unknown)."""

    frames: Sequence
    fps: float | None = None

    @classmethod
    def open(cls, source) -> Video:
        """An animated image file (GIF, WebP, APNG) as a Video, its rate from the frames' durations. No frame is
        kept: each is decoded again when it is sampled (AnimatedFrames)."""
        frames = AnimatedFrames(source)
        ms = sum(frames.durations())
        return cls(frames, fps=len(frames) / (ms / 1000) if ms > 0 else None)


class AnimatedFrames(Sequence):
    """The frames of an animated image, each decoded and converted to RGB when it is read. A clip samples a
    few of its frames (2 a second): holding every frame as an RGB copy took 6 MB per frame of a 1080p GIF,
    GBs for a long one. Frames are decoded in order (each builds on the one before), so frames read in
    increasing order cost one pass over the file. One reader at a time: the file has one position."""

    def __init__(self, source):
        self._source = source  # a file is opened again to go back (below)
        self._img = open_image(source)
        self._n = getattr(self._img, "n_frames", 1)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int):
        if not -self._n <= i < self._n:
            raise IndexError(f"frame {i} of {self._n}")
        with self._lock:
            return to_rgb(self._frame(i % self._n))

    def durations(self) -> list[float]:
        """Each frame's duration in ms (0 where the file gives none), read without converting or keeping any."""
        with self._lock:
            return [self._frame(i).info.get("duration", 0) or 0 for i in range(self._n)]

    def _frame(self, i: int):
        """The image at frame i, decoded (Pillow sets a WebP frame's duration when it decodes it). Going back
        to an earlier frame opens the file again: Pillow cannot rewind every format (an APNG fails its frame
        sequence check); a PIL image the caller opened is rewound in place."""
        from PIL import Image

        if i < self._img.tell() and not isinstance(self._source, Image.Image):
            self._img.close()
            self._img = open_image(self._source)
        try:
            self._img.seek(i)
        except (OSError, ValueError, SyntaxError, EOFError) as e:  # what Pillow's decoders raise on corrupt data
            raise ImageError(f"cannot decode frame {i} of the video: {e}") from None
        return decode(self._img, upright=False)


def sample_indices(total: int, source_fps: float | None, fps: float | None = FPS, min_frames: int = MIN_FRAMES,
                   max_frames: int = MAX_FRAMES, num_frames: int | None = None) -> list[int]:
    """Which frames of `total` the reference samples at `fps` per second (fps None: num_frames of them, or
    every frame, within min_frames..max_frames; the reference repeats frames of a clip shorter than that)."""
    if total < 1:
        raise ImageError("the video has no frames")
    if fps is not None:
        n = int(total / (source_fps or 24) * fps)
        n = min(max(n, min_frames), max_frames, total)
    else:
        n = num_frames or min(max(total, min_frames), max_frames)
    return np.linspace(0, total - 1, n).round().astype(int).tolist()


def resized_size(num_frames: int, height: int, width: int, factor: int = 32, temporal: int = 2,
                 min_pixels: int | None = None, max_pixels: int | None = None) -> tuple[int, int]:
    """(height, width) every frame is resized to (the reference's video smart_resize). min_pixels /
    max_pixels: the whole clip's budget (None: MIN_UNITS / MAX_UNITS x factor^2)."""
    min_pixels = MIN_UNITS * factor**2 if min_pixels is None else min_pixels
    max_pixels = MAX_UNITS * factor**2 if max_pixels is None else max_pixels
    if num_frames < temporal:
        raise ImageError(f"a video needs at least {temporal} frames, got {num_frames}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ImageError(f"video frames of {width}x{height} have an aspect ratio above 200")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    t = round(num_frames / temporal) * temporal
    if t * h * w > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif t * h * w < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def timestamps(indices: list[int], source_fps: float | None, temporal: int = 2) -> list[float]:
    """Seconds announced before each temporal patch: the mean time of its first and last frame."""
    idx = list(indices) + [indices[-1]] * (-len(indices) % temporal)
    t = [i / (source_fps or 24) for i in idx]
    return [(t[i] + t[i + temporal - 1]) / 2 for i in range(0, len(t), temporal)]


def preprocess_video(video: Video, processor: ImageProcessor | VideoProcessor):
    """(patches [t*h*w, patch_dim] fp32, grid (t, h, w), timestamps [t], content key) of a video. processor:
    a VideoProcessor, or an image processor (its checkpoint's video settings, else the defaults)."""
    from PIL import Image

    vp = VideoProcessor.of(processor)
    if not len(video.frames):
        raise ImageError("the video has no frames")
    idx = vp.sample_indices(len(video.frames), video.fps)
    frames = [to_rgb(open_image(video.frames[i])) for i in idx]
    sizes = {f.size for f in frames}
    if len(sizes) > 1:
        raise ImageError(f"video frames differ in size: {sorted(sizes)}")
    T = vp.frames.temporal_patch_size
    h, w = vp.resized_size(len(frames), frames[0].height, frames[0].width)
    arr = np.stack([np.asarray(f.resize((w, h), resample=Image.Resampling.BICUBIC)) for f in frames])
    if pad := -len(arr) % T:  # a whole number of temporal patches: the last frame repeated
        arr = np.concatenate([arr, np.repeat(arr[-1:], pad, axis=0)])
    patches, grid = vp.frames.frames_to_patches(arr)
    key = hashlib.sha256("".join(image_hash(f) for f in frames).encode()).hexdigest()
    return patches, grid, timestamps(idx, video.fps, T), key
