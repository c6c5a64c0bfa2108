"""A prompt with images: placeholder expansion, feature scatter, 3-D rotary positions, chunked prefill.

The chat template writes `<|vision_start|><|image_pad|><|vision_end|>` per image. Each run of
`<|image_pad|>` is one image: a single pad is expanded to the image's merged patch count (a run that already
has that length is kept). The tower's embeddings replace the pads' embeddings one for one.

Positions (interleaved mRoPE, three axes T/H/W; the text model reads them as [3, B, T]): text tokens take
consecutive positions, equal on all axes. An image starting at position p takes (p + frame, p + row,
p + column) on its merged grid, and the text after it resumes at p + max(rows, columns): so a row's next
position is no longer its token count, and the difference (`rope_delta`) is stored on the cache row, where
decode, snapshots, prompt reuse and batching already carry it.

A prompt is prefilled after whatever the cache holds: its positions start at the cache's next position
(length + rope_delta), which is what they would be had the whole conversation been prefilled at once. Only
images whose pads are in the tokens being fed are encoded: a prefix restored from a snapshot costs nothing.
Prompt reuse keys (`cache_key`) replace each image's pads with a marker derived from its content hash, so
two different pictures of the same size never share a snapshot. An image's patches are made only when it is
encoded (`VisionInput.patches`): until then it holds its resized 8-bit pixels (1/8 of the patches' bytes), so
a picture whose prefix is restored from the prompt cache, turn after turn, is never patched at all.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import threads
from .vision_input import ImageError, open_image, pixels_hash, to_rgb


@dataclass(frozen=True)
class VisionInput:
    """One image, or one temporal patch (two frames) of a video, preprocessed: its patches (`patches`), grid
    (t, h, w), content hash, and the placeholder token its run of pads is made of (<|image_pad|> or
    <|video_pad|>). A video is a VisionInput per temporal patch: the tower attends within each frame group
    anyway, and the language model places each group like an image."""

    content: torch.Tensor | Callable[[], torch.Tensor]  # the patches, or how to make them (an image's)
    grid: tuple[int, int, int]
    key: str  # content hash (prompt reuse)
    merge: int = 2
    token: int = -1  # placeholder token id

    @property
    def patches(self) -> torch.Tensor:
        """[t*h*w, patch_dim] fp32; an image's are made on each call (once per prefill that encodes it)."""
        return self.content() if callable(self.content) else self.content

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w // self.merge**2


def vision_tower(model):
    tower = getattr(model, "visual", None)
    if tower is None:
        raise ImageError("this checkpoint has no vision tower (no model.visual.* weights): image input needs a "
                         "vision-language checkpoint such as the official Qwen3.5 releases")
    return tower


def prepare_images(model, images: Sequence, max_pixels: int | None = None) -> list[VisionInput]:
    """Decode and preprocess `images` (PIL images, paths, bytes, data: URLs, or VisionInputs passed through)
    with the checkpoint's image processor. max_pixels: refuse inputs larger than this before decoding them (the server's cap)."""
    vision_tower(model)  # a text-only checkpoint is told so whatever the list holds
    # prepared before (a chat session keeps its pictures prepared) or decoded here, one at a time
    return [src if isinstance(src, VisionInput) else prepare_image(model, open_image(src, max_pixels=max_pixels))
            for src in images]


def prepare_image(model, img) -> VisionInput:
    """One decoded PIL image -> its VisionInput: the content hash and grid now (all that prompt reuse needs),
    the patches when the image is encoded, from its resized pixels (the decoded image is not kept)."""
    tower = vision_tower(model)
    processor = tower.processor
    rgb = to_rgb(img)
    pixels = processor.resize(rgb)
    grid = (1, pixels.shape[0] // processor.patch_size, pixels.shape[1] // processor.patch_size)
    return VisionInput(lambda: processor.image_patches(pixels)[0], grid, pixels_hash(rgb),
                       tower.config.spatial_merge_size, tower.config.image_token_id)


def prepare_video(model, video) -> tuple[list[VisionInput], list[float]]:
    """A video_input.Video (or an animated image file) -> one VisionInput per temporal patch, and the
    seconds each one is announced with."""
    from .video_input import Video, preprocess_video

    tower = vision_tower(model)
    video = video if isinstance(video, Video) else Video.open(video)
    patches, (t, h, w), seconds, key = preprocess_video(video, tower.processor)
    n = h * w
    return [VisionInput(patches[i * n:(i + 1) * n], (1, h, w), hashlib.sha256(f"{key}:{i}".encode()).hexdigest(),
                        tower.config.spatial_merge_size, tower.config.video_token_id) for i in range(t)], seconds


def prepare_prompt(model, ids: Sequence[int], images: Sequence, max_pixels: int | None = None, videos=(),
                   encode=None) -> tuple[list[int], list[VisionInput], list[int]]:
    """(expanded ids, preprocessed inputs in prompt order, prompt-reuse key) for a prompt with one
    placeholder per image and per video. Each video's single <|video_pad|> becomes, per temporal patch,
    `<{s:.1f} seconds>` (text, tokenized with `encode`) + <|vision_start|> + its pads + <|vision_end|>."""
    cfg = vision_tower(model).config
    images, videos = list(images), list(videos)
    # every placeholder has its input before any is decoded: a typed <|video_pad|> with only pictures is told
    # so at once, not met as a missing input halfway through the prompt
    check_placeholders(ids, cfg.image_token_id, len(images), "image")
    check_placeholders(ids, cfg.video_token_id, len(videos), "video")
    if videos and encode is None:
        raise ImageError("a prompt with a video needs the tokenizer (`encode`) for its frames' timestamps")
    pics = prepare_images(model, images, max_pixels)
    clips = [prepare_video(model, v) for v in videos]
    if clips:
        out, prev = [], 0
        for (a, _), (segs, seconds) in zip(image_runs(ids, (cfg.video_token_id,)), clips):
            out += list(ids[prev:a])
            for seg, sec in zip(segs, seconds):
                out += [*encode(f"<{sec:.1f} seconds>"), cfg.vision_start_token_id, cfg.video_token_id,
                        cfg.vision_end_token_id]
            prev = a + 1
        ids = out + list(ids[prev:])
    queues = {cfg.image_token_id: list(pics), cfg.video_token_id: [s for segs, _ in clips for s in segs]}
    inputs = [queues[ids[a]].pop(0) for a, _ in image_runs(ids, tuple(queues))]  # prompt order
    ids = expand_prompt(ids, inputs, tuple(queues))
    return ids, inputs, cache_key(ids, inputs, tuple(queues))


def check_no_placeholders(model, ids: Sequence[int]) -> None:
    """A prompt given no images or videos holds no pad of either (a typed `<|image_pad|>` would be fed to a
    vision model as a picture with no pixels). Nothing to check for a model without a vision tower."""
    visual = getattr(model, "visual", None)
    if visual is not None:
        check_placeholders(ids, visual.config.image_token_id, 0, "image")
        check_placeholders(ids, visual.config.video_token_id, 0, "video")


def check_placeholders(ids: Sequence[int], pad: int, count: int, kind: str) -> None:
    """One run of `pad` per input of this kind (`kind`: "image" or "video"); a video's run is the single pad
    the template writes (it becomes one run per temporal patch here)."""
    runs = image_runs(ids, pad)
    if len(runs) != count:
        spelling = "<|image_pad|>" if kind == "image" else "<|video_pad|>"
        raise ImageError(f"the prompt has {len(runs)} {kind} placeholder(s) ({spelling}) for {count} {kind}(s); "
                         f"put one {{'type': '{kind}'}} content part per {kind} in the chat messages")
    if kind == "video" and any(b - a != 1 for a, b in runs):
        n = next(b - a for a, b in runs if b - a != 1)
        raise ImageError(f"a video placeholder is one <|video_pad|> (the chat template's), not a run of {n}: its "
                         "frames' pads are written here")


def image_runs(ids: Sequence[int], pads) -> list[tuple[int, int]]:
    """(start, end) of each run of one of the `pads` tokens (a run is one token repeated) in ids."""
    pads = set(pads) if not isinstance(pads, int) else {pads}
    runs, i = [], 0
    while i < len(ids):
        if ids[i] in pads:
            j = i
            while j < len(ids) and ids[j] == ids[i]:
                j += 1
            runs.append((i, j))
            i = j
        else:
            i += 1
    return runs


def expand_prompt(ids: Sequence[int], images: Sequence[VisionInput], pads) -> list[int]:
    """ids with each input's run of pads at its full length (one pad per input, as the template writes it,
    or already expanded)."""
    runs = image_runs(ids, pads)
    if len(runs) != len(images):
        raise ImageError(f"the prompt has {len(runs)} image placeholder(s) (<|image_pad|>) for {len(images)} "
                         "image(s); put one {'type': 'image'} content part per image in the chat messages")
    out, prev = [], 0
    for (a, b), img in zip(runs, images):
        if ids[a] != img.token:
            raise ImageError("the prompt's image and video placeholders are not in the order of its inputs")
        if b - a not in (1, img.num_tokens):
            raise ImageError(f"an image placeholder run of {b - a} tokens does not fit an image of "
                             f"{img.num_tokens} tokens (grid {img.grid})")
        out += list(ids[prev:a]) + [img.token] * img.num_tokens
        prev = b
    return out + list(ids[prev:])


def cache_key(ids: Sequence[int], images: Sequence[VisionInput], pads) -> list[int]:
    """ids (expanded) with each input's pads replaced by a negative marker from its content hash: the token
    sequence prompt reuse matches on."""
    key = list(ids)
    for (a, b), img in zip(image_runs(ids, pads), images):
        key[a:b] = [-1 - int(img.key[:15], 16)] * (b - a)
    return key


def rope_positions(ids: Sequence[int], images: Sequence[VisionInput], pads, start: int) -> tuple[torch.Tensor, int]:
    """Rotary positions [3, T] of `ids` (expanded; its pad runs belong to `images` in order), the first
    token at position `start`, and the position the token after them takes."""
    pos = torch.empty(3, len(ids), dtype=torch.long)
    runs = image_runs(ids, pads)
    cur, prev = start, 0
    for (a, b), img in zip(runs, images):
        pos[:, prev:a] = torch.arange(cur, cur + a - prev)
        cur += a - prev
        t, h, w = img.grid
        m = img.merge
        gt, gh, gw = torch.meshgrid(torch.arange(t), torch.arange(h // m), torch.arange(w // m), indexing="ij")
        pos[:, a:b] = torch.stack([gt, gh, gw]).reshape(3, -1) + cur
        cur += max(h, w) // m
        prev = b
    pos[:, prev:] = torch.arange(cur, cur + len(ids) - prev)
    return pos, cur + len(ids) - prev


class VisionPrompt:
    """The tokens to feed after a cache's content, with the images whose pads they hold (`feed`, `images`),
    ready to prefill (`prefill`). Build it with `VisionPrompt.build`."""

    def __init__(self, feed: list[int], images: list[VisionInput], pads: tuple[int, ...]):
        self.feed, self.images, self.pads = feed, images, pads

    @classmethod
    def build(cls, model, ids: Sequence[int], images: Sequence[VisionInput], cached: int = 0) -> VisionPrompt:
        """ids: the whole prompt (expanded) with one run of pads per image in `images`; cached: how many of
        its tokens the cache already holds (a restored prefix: it must end outside an image)."""
        cfg = vision_tower(model).config
        pads = (cfg.image_token_id, cfg.video_token_id)
        runs = image_runs(ids, pads)
        if any(a < cached < b for a, b in runs):
            raise ImageError(f"a cached prefix of {cached} tokens ends inside an image")
        done = sum(1 for _, b in runs if b <= cached)
        # `images` may run past `ids` (a prefix of a prompt, fed up to a turn boundary): only those it holds
        return cls(list(ids[cached:]), list(images[done:len(runs)]), pads)

    def embeddings(self, model) -> torch.Tensor:
        """Input embeddings [1, T, hidden] of the feed: token embeddings with the images' features in place
        of their pads (each image encoded once, here)."""
        x = model.model.embed_tokens(torch.tensor([self.feed], device=model.device))
        if not self.images:
            return x
        tower = vision_tower(model)
        # one image at a time (the tower attends within each image anyway): its fp32 patches, 24 KiB per image
        # token at the official sizes, exist for one image, not for a whole context of them (GiBs) at once.
        # A kind of its own for the thread governor: seconds per patch, not per token.
        feats = torch.cat([self._encode(tower, i) for i in self.images])
        mask = torch.isin(torch.tensor(self.feed, device=x.device), torch.tensor(self.pads, device=x.device))
        if int(mask.sum()) != feats.shape[0]:
            raise ImageError(f"{int(mask.sum())} image placeholder tokens for {feats.shape[0]} image features")
        x = x.clone()
        x[0, mask] = feats.to(x.dtype)
        return x

    @staticmethod
    def _encode(tower, image: VisionInput) -> torch.Tensor:
        patches = image.patches
        return threads.run("vision", lambda: tower(patches, [image.grid]), patches.shape[0])

    def prepare(self, model, cache) -> None:
        """Positions (from the next position of `cache`, batch 1) and input embeddings (the images encoded)
        of the whole feed, before its first chunk."""
        if cache.batch_size != 1:
            raise ValueError(f"an image prompt is prefilled one row at a time; the cache has {cache.batch_size}")
        row = cache.rows[0]
        pos, self.next_position = rope_positions(self.feed, self.images, self.pads, row.length + row.rope_delta)
        self.positions = pos[:, None].to(model.device)
        self.ids = torch.tensor([self.feed], device=model.device)
        with torch.no_grad():
            self.embeds = self.embeddings(model)

    def feed_chunk(self, model, cache, a: int, b: int) -> torch.Tensor | None:
        """Feed tokens a..b-1 of the feed (after `prepare`, in order); fp32 logits [1, vocab] of the last
        token when b ends the feed, else None. The row's rope_delta is left right for the token after b, so
        a snapshot taken here (a turn boundary, the prompt's end) continues exactly."""
        kw = {"cache": cache, "positions": self.positions[..., a:b], "inputs_embeds": self.embeds[:, a:b]}
        T = len(self.feed)
        with torch.no_grad():
            if b < T:
                threads.run("prefill", lambda: model.hidden_states(self.ids[:, a:b], **kw), b - a)
                logits = None
            else:
                logits = threads.run("prefill", lambda: model(self.ids[:, a:b], logits_to_keep=1, **kw)[:, -1],
                                     b - a)
        row = cache.rows[0]
        after = self.next_position if b == T else int(self.positions[0, 0, b])  # text: every axis the same
        row.rope_delta = after - row.length
        return logits

    def prefill(self, model, cache, chunk_size: int) -> torch.Tensor:
        """Feed the whole prompt after what `cache` (batch 1) holds, in chunks of `chunk_size`; decode then
        continues at the right position. Returns fp32 logits [1, vocab] of the last token."""
        if chunk_size < 1:
            raise ValueError(f"prefill chunk size must be >= 1, got {chunk_size}")
        self.prepare(model, cache)
        T = len(self.feed)
        for a in range(0, T, chunk_size):
            logits = self.feed_chunk(model, cache, a, min(T, a + chunk_size))
        return logits
