"""What users send as images, beyond the reference processor's happy path: EXIF-rotated photos, 16-bit and
float grayscale, premultiplied alpha, wrapped base64, strings that are not paths; and the server's image
parts, whose sizes are checked against the context before any of them is decoded."""

import base64
import io
import types

import numpy as np
import pytest
import torch
from PIL import Image

from qwen35.multimodal import prepare_image
from qwen35.server import images as server_images
from qwen35.server.errors import APIError
from qwen35.vision_input import ImageError, ImageProcessor, decode_data_url, image_hash, open_image, to_rgb


def noise(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def encoded(img, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def data_url(data: bytes, wrap=False) -> str:
    text = (base64.encodebytes(data).decode() if wrap else base64.b64encode(data).decode())
    return "data:image/png;base64," + text


# ---- EXIF orientation ----

def phone_photo(orientation=6) -> bytes:
    """A JPEG stored 256 wide and 96 high whose EXIF says: turn me 90 degrees clockwise to show me."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(noise(96, 256), "JPEG", exif=exif.tobytes())


def test_exif_orientation_is_applied_to_files_bytes_and_data_urls(tmp_path):
    jpeg = phone_photo()
    (tmp_path / "photo.jpg").write_bytes(jpeg)
    stored = Image.open(io.BytesIO(jpeg)).convert("RGB")
    upright = stored.transpose(Image.Transpose.ROTATE_270)  # orientation 6: 90 degrees clockwise
    for source in (jpeg, tmp_path / "photo.jpg", str(tmp_path / "photo.jpg"), data_url(jpeg)):
        img = open_image(source)
        assert img.size == (96, 256)
        assert np.array_equal(np.asarray(to_rgb(img)), np.asarray(upright))
    # the prompt-reuse key follows the pixels the model sees
    assert image_hash(jpeg) == image_hash(upright) != image_hash(stored)
    assert ImageProcessor().preprocess(jpeg)[1] == ImageProcessor().preprocess(upright)[1] == (1, 28, 10)


def test_a_pil_image_is_taken_as_the_caller_built_it():
    """The caller owns an in-memory image: its EXIF tag is not applied again (transformers' load_image too)."""
    img = Image.open(io.BytesIO(phone_photo()))
    assert open_image(img).size == (256, 96)


# ---- more than 8 bits, premultiplied alpha ----

def gray(rgb: Image.Image) -> np.ndarray:
    arr = np.asarray(rgb)
    assert rgb.mode == "RGB" and (arr == arr[..., :1]).all()  # grey: three equal channels
    return arr[..., 0]


def test_16_bit_grayscale_keeps_its_top_byte():
    ramp = np.arange(0, 65536, 64, dtype=np.uint16).reshape(32, 32)
    img = open_image(encoded(Image.fromarray(ramp)))
    assert img.mode == "I;16"
    assert np.array_equal(gray(to_rgb(img)), (ramp >> 8).astype(np.uint8))  # all 256 levels, not clipped to white


def test_16_bit_transparent_value_is_composited_onto_white():
    ramp = np.arange(0, 65536, 256, dtype=np.uint16).reshape(16, 16)
    img = open_image(encoded(Image.fromarray(ramp), transparency=512))
    assert gray(to_rgb(img))[0, :4].tolist() == [0, 1, 255, 3]


def test_32_bit_integers_are_read_as_16_bit_and_clipped():
    values = np.array([[-5, 0, 255, 256], [4095, 65535, 65536, 2**31 - 1]], dtype=np.int32)
    assert gray(to_rgb(Image.fromarray(values))).tolist() == [[0, 0, 0, 1], [15, 255, 255, 255]]


def test_float_images_are_0_to_1_or_0_to_255():
    unit = np.array([[0.0, 0.5, 1.0, -0.2], [np.nan, 0.25, 0.999, 0.001]], dtype=np.float32)
    assert gray(to_rgb(Image.fromarray(unit))).tolist() == [[0, 128, 255, 0], [0, 64, 255, 0]]
    bytes_range = np.array([[0.0, 1.5, 254.6, 300.0]], dtype=np.float32)  # one value above 1: a 0..255 scale
    assert gray(to_rgb(Image.fromarray(bytes_range))).tolist() == [[0, 2, 255, 255]]


def test_premultiplied_alpha_is_composited_like_straight_alpha():
    assert np.asarray(to_rgb(Image.new("RGBa", (3, 2), (0, 0, 0, 0)))).tolist() == [[[255] * 3] * 3] * 2
    assert np.asarray(to_rgb(Image.new("RGBa", (1, 1), (10, 20, 30, 255)))).tolist() == [[[10, 20, 30]]]
    assert np.asarray(to_rgb(Image.new("La", (1, 1), (0, 0)))).tolist() == [[[255] * 3]]
    assert np.asarray(to_rgb(Image.new("La", (1, 1), (100, 255)))).tolist() == [[[100] * 3]]
    patches, grid = ImageProcessor().preprocess(Image.new("La", (40, 40), (0, 0)))
    assert grid == (1, 16, 16) and bool((patches == 1.0).all())  # white, normalized


# ---- data URLs and paths ----

def test_wrapped_base64_is_accepted_and_garbage_still_refused():
    png = encoded(noise(30, 40))
    wrapped = data_url(png, wrap=True)
    assert "\n" in wrapped and decode_data_url(wrapped) == png
    assert decode_data_url(wrapped.replace("\n", "\r\n  \t")) == png
    assert image_hash(wrapped) == image_hash(png)
    # the URL-safe alphabet, padded or not, is the same image; mixed with the standard one it is refused
    safe = base64.urlsafe_b64encode(png).decode()
    assert "-" in safe or "_" in safe
    assert decode_data_url("data:image/png;base64," + safe) == png
    assert decode_data_url("data:image/png;base64," + safe.rstrip("=")) == png
    for bad in ("data:image/png;base64,@@@@\n", "data:image/png;base64,iVBO\u3000Rw0K", "data:image/png;base64,A\nB",
                "data:image/png;base64,ab-/", "data:image/png;base64,a_b+", "data:image/png;base64,abcde"):
        with pytest.raises(ImageError, match="^the image's data URL holds malformed base64$"):
            decode_data_url(bad)


def test_a_string_that_is_not_a_path_is_an_image_error(tmp_path):
    pasted = base64.b64encode(encoded(Image.new("RGB", (64, 64)))).decode() * 20  # no data: prefix
    with pytest.raises(ImageError) as e:
        open_image(pasted)
    assert str(e.value) == (f"cannot use '{pasted[:60]}... ({len(pasted)} characters)' as an image path (File name "
                            "too long); this looks like base64 image data: give it as a data URL, "
                            "data:image/png;base64,<data>")
    short = pasted[:200]  # short enough to be a file name: not found, with the same hint
    with pytest.raises(ImageError) as e:
        open_image(short)
    assert str(e.value) == (f"image not found: {short}; this looks like base64 image data: give it as a data URL, "
                            "data:image/png;base64,<data>")
    with pytest.raises(ImageError, match="^an image must be a PIL image, a file path, bytes or a data: URL, not int$"):
        open_image(5)
    with pytest.raises(ImageError, match=f"^image is a directory, not an image file: {tmp_path}$"):
        open_image(tmp_path)
    with pytest.raises(ImageError, match="^image not found: /nowhere/cat.png$"):
        open_image("/nowhere/cat.png")  # an ordinary missing path: no hint


def test_chat_image_command_reports_a_pasted_base64_string():
    """`/image <base64>` in qwen35 chat is a message; before, the OSError ended the REPL."""
    from qwen35.commands.chat import attach_image

    model = types.SimpleNamespace(visual=types.SimpleNamespace(processor=ImageProcessor(), config=None))
    pasted = base64.b64encode(encoded(Image.new("RGB", (64, 64)))).decode() * 20
    pending = []
    msg = attach_image(model, pasted, pending)
    assert msg.startswith("cannot use the image: cannot use 'iVBOR") and msg.endswith(
        "(File name too long); this looks like base64 image data: give it as a data URL, data:image/png;base64,<data>")
    assert pending == []


# ---- prepared images: hash and grid now, patches at prefill ----

def vision_model(context=262144, processor=None):
    """What load_images and prepare_image read of a model: the tower's processor and token ids, the context."""
    visual = types.SimpleNamespace(processor=processor or ImageProcessor(),
                                   config=types.SimpleNamespace(spatial_merge_size=2, image_token_id=7))
    return types.SimpleNamespace(visual=visual, config=types.SimpleNamespace(max_position_embeddings=context))


def test_prepared_image_makes_its_patches_when_asked(monkeypatch):
    img = noise(70, 50)
    made = []
    frames_to_patches = ImageProcessor.frames_to_patches
    monkeypatch.setattr(ImageProcessor, "frames_to_patches", lambda self, f: made.append(1) or frames_to_patches(self, f))
    vi = prepare_image(vision_model(), img)
    assert made == [] and vi.key == image_hash(img) and vi.num_tokens == 20 * 14 // 4
    patches, grid = ImageProcessor().preprocess(img)
    assert vi.grid == grid == (1, 20, 14)
    assert torch.equal(vi.patches, patches) and len(made) == 2


def parts_of(*urls):
    return [(f"messages[0].content[{i}]", u) for i, u in enumerate(urls)]


def no_decoding(monkeypatch):
    def refuse(img, upright=True):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(server_images, "decode", refuse)


def test_server_refuses_images_over_the_context_before_decoding_any(monkeypatch):
    """20 solid-colour 2048x2048 PNGs (0.3 MiB of body) would decode to 240 MiB and 1.9 GiB of patches."""
    no_decoding(monkeypatch)
    url = data_url(encoded(Image.new("RGB", (2048, 2048), (200, 30, 30))))
    with pytest.raises(APIError) as e:
        server_images.load_images(parts_of(*[url] * 20), vision_model(context=65536), False, 2048 * 2048,
                                  2**20, text_tokens=3, max_tokens=100)
    assert (e.value.status, e.value.param, e.value.code) == (400, "messages", "context_length_exceeded")
    assert e.value.message == (
        "the prompt holds at least 81923 tokens (81920 of them for its 20 image(s)); with max_tokens (100) that "
        "exceeds the context of 65536 tokens; send fewer or smaller images, shorten the prompt or lower max_tokens")


def test_server_names_the_part_whose_size_is_refused(monkeypatch):
    no_decoding(monkeypatch)
    good, thin = data_url(encoded(noise(40, 40))), data_url(encoded(noise(2, 900)))
    with pytest.raises(APIError) as e:
        server_images.load_images(parts_of(good, good, thin), vision_model(), False, 10**6, 2**20)
    assert (e.value.param, e.value.message) == (
        "messages[0].content[2]", "'messages[0].content[2]': image of 900x2 has an aspect ratio above 200")


def test_server_prepares_the_images_that_fit():
    a, b = noise(40, 72, 1), noise(56, 40, 2)
    out = server_images.load_images(parts_of(data_url(encoded(a)), data_url(encoded(b), wrap=True)),
                                    vision_model(), False, 10**6, 2**20, text_tokens=3, max_tokens=100)
    for vi, img in zip(out, (a, b)):
        patches, grid = ImageProcessor().preprocess(img)
        assert vi.key == image_hash(img) and vi.grid == grid and torch.equal(vi.patches, patches)
