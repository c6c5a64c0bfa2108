"""Video in: frames sampled, resized and cut into the tower's patches, with each frame pair's timestamp.

What a video can be, without a new dependency: a list of frames (PIL images, paths, bytes) with the rate they
were taken at, or an animated GIF / WebP / PNG file that Pillow decodes (its frame durations give the rate).
Decoding MP4 would need PyAV or OpenCV (tens of MB); extract frames with ffmpeg and pass them as a list.

The rules are the Qwen3-VL video processor's (transformers `Qwen3VLVideoProcessor`, which Qwen3.5 uses):
- sampling: round(linspace(0, n - 1, k)) with k = int(n / source_fps * 2) clamped to [4, 768] and to n;
- one size for every frame: sides rounded to multiples of patch x merge (32), the whole clip (frames x
  pixels) scaled into [128*32*32, 768*32*32] pixels; the frame count padded to a multiple of the temporal
  patch (2) by repeating the last frame; normalized like images (mean/std 0.5);
- each pair of frames is one temporal patch, announced in the prompt as `<{t:.1f} seconds>` (the mean time of
  its two frames) before its own `<|vision_start|><|video_pad|>...<|vision_end|>`.
The reference resizes with torchvision (not installable beside torch 2.13 here); ours resizes with Pillow
bicubic, so pixel values can differ from it in the last bits: the model is checked on identical pixel values.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from .vision_input import ImageError, ImageProcessor, image_hash, open_image, to_rgb

FPS = 2.0  # frames sampled per second of video
MIN_FRAMES, MAX_FRAMES = 4, 768
# the whole clip's pixels (frames x height x width), in units of factor^2 = (patch x merge)^2: the reference's
# 128*32*32 .. 768*32*32 at the official 16 px patches, the same token budget for a tower of other patches
MIN_UNITS, MAX_UNITS = 128, 768


@dataclass
class Video:
    """Frames (PIL images, paths or bytes) taken at `fps` frames per second (None: 24, the reference's
    default when a rate is unknown)."""

    frames: list
    fps: float | None = None

    @classmethod
    def open(cls, source) -> Video:
        """An animated image file (GIF, WebP, APNG) as a Video, its rate from the frames' durations."""
        from PIL import ImageSequence

        img = open_image(source)
        frames, ms = [], 0.0
        for f in ImageSequence.Iterator(img):
            frames.append(to_rgb(f.copy()))
            ms += f.info.get("duration", 0) or 0
        return cls(frames, fps=len(frames) / (ms / 1000) if ms > 0 else None)


def sample_indices(total: int, source_fps: float | None, fps: float = FPS) -> list[int]:
    """Which frames of `total` the reference samples at `fps` per second."""
    if total < 1:
        raise ImageError("the video has no frames")
    n = int(total / (source_fps or 24) * fps)
    n = min(max(n, MIN_FRAMES), MAX_FRAMES, total)
    return np.linspace(0, total - 1, n).round().astype(int).tolist()


def resized_size(num_frames: int, height: int, width: int, factor: int = 32, temporal: int = 2) -> tuple[int, int]:
    """(height, width) every frame is resized to (the reference's video smart_resize)."""
    min_pixels, max_pixels = MIN_UNITS * factor**2, MAX_UNITS * factor**2
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


def preprocess_video(video: Video, processor: ImageProcessor, fps: float = FPS):
    """(patches [t*h*w, patch_dim] fp32, grid (t, h, w), timestamps [t], content key) of a video."""
    from PIL import Image

    if not video.frames:
        raise ImageError("the video has no frames")
    idx = sample_indices(len(video.frames), video.fps, fps)
    frames = [to_rgb(open_image(video.frames[i])) for i in idx]
    sizes = {f.size for f in frames}
    if len(sizes) > 1:
        raise ImageError(f"video frames differ in size: {sorted(sizes)}")
    T = processor.temporal_patch_size
    h, w = resized_size(len(frames), frames[0].height, frames[0].width, processor.factor, T)
    arr = np.stack([np.asarray(f.resize((w, h), resample=Image.Resampling.BICUBIC)) for f in frames])
    if pad := -len(arr) % T:  # a whole number of temporal patches: the last frame repeated
        arr = np.concatenate([arr, np.repeat(arr[-1:], pad, axis=0)])
    patches, grid = processor.frames_to_patches(arr)
    key = hashlib.sha256("".join(image_hash(f) for f in frames).encode()).hexdigest()
    return patches, grid, timestamps(idx, video.fps, T), key
