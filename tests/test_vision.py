"""The vision tower and its preprocessing against transformers (the oracle) on the same weights and images."""

import copy

import numpy as np
import pytest
import torch
from oracle import assert_within_oracle_noise
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from qwen35.errors import CheckpointError
from qwen35.vision_input import ImageError, ImageProcessor, decode_data_url, image_hash, open_image
from qwen35.weights import load_model

QWEN35 = {"patch_size": 16, "merge_size": 2, "temporal_patch_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}


def reference(min_pixels=65536, max_pixels=16777216, **kw):
    return Qwen2VLImageProcessorPil(**{**QWEN35, **kw}, size={"shortest_edge": min_pixels, "longest_edge": max_pixels})


def noise(h, w, mode="RGB", seed=0):
    channels = {"RGB": 3, "RGBA": 4, "L": None, "LA": 2}[mode]
    shape = (h, w) if channels is None else (h, w, channels)
    arr = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    return Image.fromarray(arr, mode)


def palette_with_transparency():
    img = noise(40, 70).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    img.info["transparency"] = 3
    return img


IMAGES = {
    "tiny": lambda: noise(3, 5),
    "below_min_pixels": lambda: noise(100, 80),
    "non_square": lambda: noise(37, 300),
    "tall": lambda: noise(500, 64),
    "rgba": lambda: noise(120, 90, "RGBA"),
    "grayscale": lambda: noise(64, 96, "L"),
    "gray_alpha": lambda: noise(50, 50, "LA"),
    "palette_transparent": palette_with_transparency,
    "screenshot_720p": lambda: noise(720, 1280),
}


@pytest.mark.parametrize("name", IMAGES)
def test_preprocessing_equals_the_reference_processor(name):
    img = IMAGES[name]()
    ref = reference()(images=[img], return_tensors="pt")
    ours, grid = ImageProcessor().preprocess(img)
    assert grid == tuple(ref["image_grid_thw"][0].tolist())
    assert torch.equal(ours, ref["pixel_values"])  # bit for bit


def test_above_max_pixels_and_configured_limits_equal_the_reference():
    img = noise(600, 800)
    for lo, hi in ((65536, 200_000), (4096, 50_000), (300_000, 16777216)):
        ref = reference(lo, hi)(images=[img], return_tensors="pt")
        ours, grid = ImageProcessor(min_pixels=lo, max_pixels=hi).preprocess(img)
        assert grid == tuple(ref["image_grid_thw"][0].tolist())
        assert torch.equal(ours, ref["pixel_values"])
    assert ImageProcessor(max_pixels=200_000).resized_size(600, 800) == (384, 512)


def test_processor_reads_preprocessor_config(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(
        '{"size": {"shortest_edge": 1024, "longest_edge": 4096}, "patch_size": 8, "image_mean": [0.1, 0.2, 0.3]}')
    p = ImageProcessor.from_model_dir(tmp_path)
    assert (p.min_pixels, p.max_pixels, p.patch_size, p.image_mean) == (1024, 4096, 8, (0.1, 0.2, 0.3))
    assert ImageProcessor.from_model_dir(tmp_path / "missing") == ImageProcessor()


def test_bad_images_are_clear_errors(tmp_path):
    with pytest.raises(ImageError, match="malformed base64"):
        decode_data_url("data:image/png;base64,@@@not-base64")
    with pytest.raises(ImageError, match="not an image"):
        open_image(b"this is text, not a PNG")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ImageError, match="notes.txt is not an image"):
        open_image(tmp_path / "notes.txt")
    with pytest.raises(ImageError, match="image not found"):
        open_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="over the limit of 1000 pixels"):
        open_image(noise(40, 30), max_pixels=1000)
    with pytest.raises(ImageError, match="aspect ratio"):
        ImageProcessor().resized_size(1, 300)


def test_image_hash_keys_content_not_encoding():
    import io

    img = noise(30, 40)
    png, bmp = io.BytesIO(), io.BytesIO()
    img.save(png, "PNG")
    img.save(bmp, "BMP")
    assert image_hash(png.getvalue()) == image_hash(bmp.getvalue()) == image_hash(img)
    assert image_hash(img) != image_hash(noise(30, 40, seed=1))


def test_tower_matches_transformers(vision_replica):
    """Merged embeddings for three inputs at once (two images and a two-frame video grid) against
    Qwen3_5VisionModel, within the oracle's own fp32 rounding."""
    hf, path = vision_replica
    model = load_model(path, dtype=torch.float32)
    tower = model.visual
    assert tower is not None and tower.config.depth == 2
    grid = torch.tensor([[1, 4, 6], [2, 2, 2], [1, 8, 4]])
    px = torch.randn(int(grid.prod(-1).sum()), tower.config.patch_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = tower(px, grid)
        fp32 = hf.model.visual.float()(px, grid_thw=grid).pooler_output
        fp64 = copy.deepcopy(hf.model.visual).double()(px.double(), grid_thw=grid).pooler_output
    assert ours.shape == (int(grid.prod(-1).sum()) // 4, 64)
    assert_within_oracle_noise({"tower": ours}, {"tower": fp32}, {"tower": fp64})
    assert (ours - fp64).abs().max() <= 1e-4


def test_tower_keeps_out_of_the_text_model(vision_replica):
    """The tower is not a submodule: the text model's parameter walk (fusion, quantization, LoRA,
    checkpoint writing) sees exactly the text weights."""
    _, path = vision_replica
    model = load_model(path, dtype=torch.bfloat16)
    assert not any("visual" in n for n, _ in model.named_parameters())
    assert model.visual.dtype == torch.bfloat16
    assert model.visual.blocks[0].norm1.weight.dtype == torch.float32  # LayerNorms stay fp32
    assert not any(k.startswith("model.visual.") for k in model.checkpoint_info.skipped)


def test_text_only_checkpoint_has_no_tower(tied_replica):
    assert load_model(tied_replica[1]).visual is None


def test_vision_checkpoint_errors_name_the_tensor(vision_replica, tmp_path):
    import json
    import shutil

    _, path = vision_replica
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["vision_config"]["intermediate_size"] = 48
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'model\.visual\.blocks\.0\.mlp\.linear_fc1"):
        load_model(bad)
    cfg["vision_config"]["intermediate_size"] = 64
    cfg["vision_config"]["depth"] = 3
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.visual\.blocks\.2\."):
        load_model(bad)


def test_replica_writer_includes_the_tower(tmp_path):
    """`qwen35 replica --vision`: model.visual.* at the shape's sizes, loadable, and the tower runs."""
    from qwen35.commands.replica import build_replica
    from qwen35.shapes import VISION_SHAPES

    build_replica(tmp_path, "tiny", vision=True)
    model = load_model(tmp_path, dtype=torch.bfloat16)
    c = model.visual.config
    assert (c.depth, c.hidden_size, c.num_heads, c.out_hidden_size) == (*[VISION_SHAPES["tiny"][k] for k in (
        "depth", "hidden_size", "num_heads")], model.config.hidden_size)
    assert c.image_token_id == 248056 and c.patch_size == 16
    patches, grid = model.visual.processor.preprocess(noise(50, 70))
    with torch.no_grad():
        out = model.visual(patches, [grid])
    assert out.shape == (grid[1] * grid[2] // 4, model.config.hidden_size) and torch.isfinite(out).all()


# ---- video: video_preprocessor_config.json against transformers' Qwen3VLVideoProcessor read from the same file ----

QWEN35_VIDEO = {  # the Qwen3.5 release's video_preprocessor_config.json
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True, "do_sample_frames": True,
    "fps": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "max_frames": 768, "merge_size": 2, "min_frames": 4,
    "patch_size": 16, "resample": 3, "rescale_factor": 1 / 255, "return_metadata": False,
    "size": {"longest_edge": 25165824, "shortest_edge": 4096}, "temporal_patch_size": 2,
    "video_processor_type": "Qwen3VLVideoProcessor"}

VIDEO_CONFIGS = {  # name: (the file, or None for none; frames, height, width, the clip's rate)
    "no_file": (None, 9, 40, 56, 3),
    "qwen35_release": (QWEN35_VIDEO, 9, 40, 56, 3),
    "release_long_clip": (QWEN35_VIDEO, 30, 90, 160, 4),
    "sampling_and_normalization": ({"size": {"shortest_edge": 8192, "longest_edge": 60000}, "fps": 1, "min_frames": 2,
                                    "max_frames": 6, "image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.3, 0.4],
                                    "patch_size": 8}, 25, 50, 70, 2),
    "per_frame_cap": ({**QWEN35_VIDEO, "cap_pixels_per_frame": True, "max_video_tokens": 20}, 12, 120, 200, 6),
    "every_frame": ({"fps": None, "min_frames": 8, "max_frames": 16}, 5, 40, 56, None),
    "num_frames": ({"fps": None, "num_frames": 3}, 11, 40, 56, 5),
}


def reference_video(monkeypatch, directory, frames, source_fps):
    """Qwen3VLVideoProcessor.from_pretrained(directory) on `frames` [F, H, W, 3]: (pixel_values_videos, grid,
    timestamps). Its resize and normalize are torchvision's, which does not install here: they are replaced by
    Pillow's bicubic (what ours resizes with) and the plain (x - mean) / std; sampling, sizing, padding and
    patch order are the reference's own."""
    from transformers.image_processing_backends import TorchvisionBackend
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    def resize(self, image, size, resample=None, **kw):
        flat = image.reshape(-1, *image.shape[-3:]).permute(0, 2, 3, 1).numpy()
        out = np.stack([np.asarray(Image.fromarray(f).resize((size.width, size.height), Image.Resampling.BICUBIC))
                        for f in flat])
        return torch.from_numpy(out).permute(0, 3, 1, 2).reshape(*image.shape[:-2], size.height, size.width)

    def normalize(self, image, mean, std, **kw):
        return (image - torch.as_tensor(mean).reshape(-1, 1, 1)) / torch.as_tensor(std).reshape(-1, 1, 1)

    monkeypatch.setattr(TorchvisionBackend, "resize", resize)
    monkeypatch.setattr(TorchvisionBackend, "normalize", normalize)
    proc = Qwen3VLVideoProcessor() if directory is None else Qwen3VLVideoProcessor.from_pretrained(directory)
    out = proc(videos=[frames], video_metadata=[{"total_num_frames": len(frames), "fps": source_fps}],
               do_convert_rgb=False, return_metadata=True, return_tensors="pt")
    meta = out["video_metadata"][0]
    # the processor's: the clip's rate, or 24 where it has none
    seconds = Qwen3VLProcessor._calculate_timestamps(None, meta.frames_indices, meta.fps or 24, proc.temporal_patch_size)
    return out["pixel_values_videos"], tuple(out["video_grid_thw"][0].tolist()), seconds


@pytest.mark.parametrize("name", VIDEO_CONFIGS)
def test_video_preprocessing_follows_video_preprocessor_config(name, tmp_path, monkeypatch):
    """Sampled frames, size, patches and timestamps from the checkpoint's video_preprocessor_config.json (they
    were the class defaults whatever the file said: the release's 4096..25165824-pixel clip budget was read as
    131072..786432)."""
    import json

    from qwen35.video_input import Video, preprocess_video

    cfg, n, h, w, source_fps = VIDEO_CONFIGS[name]
    if cfg is not None:
        (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(cfg))
    frames = np.random.default_rng(0).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    ref, ref_grid, ref_seconds = reference_video(monkeypatch, None if cfg is None else tmp_path, frames, source_fps)
    processor = ImageProcessor.from_model_dir(tmp_path)
    assert (processor.video is None) == (cfg is None)
    ours, grid, seconds, _ = preprocess_video(Video([Image.fromarray(f) for f in frames], fps=source_fps), processor)
    assert grid == ref_grid and seconds == pytest.approx(ref_seconds)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)  # the reference's fused rescale rounds apart


def test_video_preprocessor_config_reaches_the_model(vision_replica, tmp_path):
    import json
    import shutil

    from qwen35.multimodal import prepare_video
    from qwen35.video_input import Video

    _, path = vision_replica
    shutil.copytree(path, tmp_path / "m")
    (tmp_path / "m" / "video_preprocessor_config.json").write_text(json.dumps(QWEN35_VIDEO))
    model = load_model(tmp_path / "m")
    assert model.visual.processor.video.max_pixels == 25165824
    segs, seconds = prepare_video(model, Video([noise(40, 56, seed=i) for i in range(9)], fps=3))
    # frames 0 2 3 5 6 8 of 9 (2 fps of 3) in 40x56: 32x64 within the release's budget (160x224 under the class
    # defaults), 3 temporal patches at (0 + 2/3) / 2, (1 + 5/3) / 2, (2 + 8/3) / 2 seconds
    assert [s.grid for s in segs] == [(1, 2, 4)] * 3 and seconds == pytest.approx([1 / 3, 4 / 3, 7 / 3])


BAD_VIDEO_CONFIGS = [
    ('{"fps": "fast"}', "'fps' must be a positive number, got 'fast'"),
    ('{"fps": 0}', "'fps' must be a positive number, got 0"),
    ('{"min_frames": 0}', "'min_frames' must be a positive integer, got 0"),
    ('{"max_frames": 7.5}', "'max_frames' must be a positive integer, got 7.5"),
    ('{"min_frames": 8, "max_frames": 4}', "'min_frames' (8) is above 'max_frames' (4)"),
    ('{"fps": 2, "num_frames": 8}', "'fps' and 'num_frames' both set"),
    ('{"size": {"shortest_edge": 4096}}', "'size' must be an object with \"shortest_edge\" and \"longest_edge\""),
    ('{"size": [4096, 25165824]}', "'size' must be an object"),
    ('{"size": {"shortest_edge": -1, "longest_edge": 10}}', "'size.shortest_edge' must be a positive integer"),
    ('{"size": {"shortest_edge": 100, "longest_edge": 10}}', "'size' has shortest_edge 100 above longest_edge 10"),
    ('{"patch_size": true}', "'patch_size' must be a positive integer, got True"),
    ('{"image_std": [0.5, 0.5]}', "'image_std' must be a list of 3 numbers"),
    ('{"image_std": [0.5, 0, 0.5]}', "'image_std' must not hold 0"),
    ('{"rescale_factor": -1}', "'rescale_factor' must be a positive number"),
    ('{"cap_pixels_per_frame": "yes"}', "'cap_pixels_per_frame' must be true, false or null"),
    ('[1, 2]', "expected a JSON object, got list"),
    ('{"fps": 2,', "not valid JSON"),
]


@pytest.mark.parametrize("text,message", BAD_VIDEO_CONFIGS)
def test_bad_video_preprocessor_config_names_the_file_and_key(tmp_path, text, message):
    f = tmp_path / "video_preprocessor_config.json"
    f.write_text(text)
    with pytest.raises(ImageError) as e:
        ImageProcessor.from_model_dir(tmp_path)
    assert str(e.value).startswith(f"{f}: ") and message in str(e.value)
