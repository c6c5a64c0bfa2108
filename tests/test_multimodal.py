"""Prompts with images against transformers' Qwen3_5ForConditionalGeneration on the same weights: logits
(fp32, within the oracle's own rounding), greedy continuations, later turns, snapshots and batched decode."""

import numpy as np
import pytest
import torch
from oracle import assert_logits_match_oracle
from PIL import Image
from replica import VISION_TOKENS

import qwen35
from qwen35.generation import generate_step
from qwen35.multimodal import VisionPrompt, prepare_prompt, rope_positions
from qwen35.prompt_cache import PromptCache
from qwen35.sampling import SamplingParams
from qwen35.vision_input import ImageError

PAD, START, END = VISION_TOKENS["image_token_id"], VISION_TOKENS["vision_start_token_id"], VISION_TOKENS[
    "vision_end_token_id"]


def picture(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def text(n, seed):
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def image_part():
    return [START, PAD, END]


@pytest.fixture(scope="module")
def pair(vision_replica):
    hf, path = vision_replica
    return hf.float(), qwen35.load_model(path, dtype=torch.float32)


def hf_inputs(ids, inputs):
    ids_t = torch.tensor([ids])
    kw = {"mm_token_type_ids": (ids_t == PAD).int()}
    if inputs:
        kw["pixel_values"] = torch.cat([i.patches for i in inputs])
        kw["image_grid_thw"] = torch.tensor([i.grid for i in inputs])
    return ids_t, kw


def full_logits(model, ids, inputs):
    """Our logits for every position of a prompt, with no cache."""
    vp = VisionPrompt(list(ids), list(inputs), (PAD,))
    pos, _ = rope_positions(ids, inputs, PAD, 0)
    with torch.no_grad():
        return model(torch.tensor([ids]), positions=pos[:, None], inputs_embeds=vp.embeddings(model))


PROMPTS = {
    "one_image": lambda: ([text(5, 1) + image_part() + text(6, 2)], [picture(40, 56, 0)]),
    "two_images": lambda: ([text(3, 3) + image_part() + image_part() + text(4, 4)],
                           [picture(30, 90, 1), picture(64, 48, 2)]),
    "image_between_turns": lambda: ([text(6, 5) + image_part() + text(9, 6) + image_part() + text(3, 7)],
                                    [picture(50, 50, 3), picture(20, 100, 4)]),
    "image_first": lambda: ([image_part() + text(4, 8)], [picture(33, 47, 5)]),
}


@pytest.mark.parametrize("name", PROMPTS)
def test_logits_match_transformers(pair, name):
    hf, model = pair
    (ids,), images = PROMPTS[name]()
    ids, inputs, _ = prepare_prompt(model, ids, images)
    assert ids.count(PAD) == sum(i.num_tokens for i in inputs) > len(inputs)
    ours = full_logits(model, ids, inputs)
    ids_t, kw = hf_inputs(ids, inputs)
    assert_logits_match_oracle(ours, hf, ids_t, **kw)


def test_positions_after_an_image_follow_the_grid(pair):
    _, model = pair
    ids, inputs, _ = prepare_prompt(model, [7, START, PAD, END, 8], [picture(32, 64, 0)])
    grid = inputs[0].grid  # (1, 8, 16) patches of 4 px: a 4 x 8 merged grid
    assert grid == (1, 8, 16) and inputs[0].num_tokens == 32
    pos, nxt = rope_positions(ids, inputs, PAD, 10)
    assert pos[:, :2].tolist() == [[10, 11]] * 3
    img = pos[:, 2:34]
    assert img[0].unique().tolist() == [12] and img[1].unique().tolist() == list(range(12, 16))
    assert img[2].unique().tolist() == list(range(12, 20))
    assert pos[:, 34:].tolist() == [[20, 21]] * 3 and nxt == 22  # resumes at 12 + max(4, 8)


def hf_greedy(hf, ids, inputs, n):
    ids_t, kw = hf_inputs(ids, inputs)
    with torch.no_grad():
        out = hf.generate(ids_t, max_new_tokens=n, do_sample=False, **kw)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("chunk", [512, 7])
def test_greedy_decoding_continues_like_transformers(pair, chunk):
    """Chunked prefill (a chunk boundary inside the image) and decode: positions after the image are right."""
    hf, model = pair
    (ids,), images = PROMPTS["image_between_turns"]()
    ids, inputs, _ = prepare_prompt(model, ids, images)
    cache = model.make_cache()
    vp = VisionPrompt.build(model, ids, inputs)
    params = SamplingParams(temperature=0.0, max_tokens=12)
    ours = [r.token for r in generate_step(model, ids, cache, params=params, prefill_chunk_size=chunk, vision=vp)]
    assert ours == hf_greedy(hf, ids, inputs, 12)
    assert cache.rows[0].rope_delta == rope_positions(ids, inputs, PAD, 0)[1] - len(ids) < 0


def test_later_turn_with_a_new_image_continues_the_cache(pair):
    """Turn 1 (an image) prefilled and decoded, turn 2 (another image) fed after it in the same cache: the
    logits equal transformers' over the whole conversation at once."""
    hf, model = pair
    ids1, in1, _ = prepare_prompt(model, text(4, 1) + image_part() + text(3, 2), [picture(40, 40, 1)])
    cache = model.make_cache()
    params = SamplingParams(temperature=0.0, max_tokens=4)
    answer = [r.token for r in generate_step(model, ids1, cache, params=params,
                                             vision=VisionPrompt.build(model, ids1, in1))]
    ids2, in2, _ = prepare_prompt(model, [answer[-1], *text(3, 3), *image_part(), *text(2, 4)], [picture(24, 60, 2)])
    vp = VisionPrompt.build(model, ids2, in2)
    with torch.no_grad():
        pos, _ = rope_positions(vp.feed, vp.images, PAD, cache.rows[0].length + cache.rows[0].rope_delta)
        ours = model(torch.tensor([ids2]), cache=cache, positions=pos[:, None], inputs_embeds=vp.embeddings(model))
    whole = ids1 + answer[:-1] + ids2
    ids_t, kw = hf_inputs(whole, in1 + in2)
    with torch.no_grad():
        ref = hf(ids_t, **kw).logits[:, -len(ids2):]
    assert (ours - ref).abs().max() <= 1e-4


def test_snapshot_and_prompt_reuse_with_an_image(pair):
    """A second question about the same picture restores the first prompt's snapshot: the image is not
    encoded again, and the answer equals a cold prefill of the whole prompt. A different picture of the
    same size does not match that snapshot."""
    hf, model = pair
    img = picture(40, 40, 7)
    first = text(4, 1) + image_part() + text(3, 2)
    second = first + text(5, 3)
    pc = PromptCache(model)
    params = SamplingParams(temperature=0.0, max_tokens=6)

    def run(prompt, image):
        ids, inputs, key = prepare_prompt(model, prompt, [image])
        cache, cached = pc.lookup(key)
        vp = VisionPrompt.build(model, ids, inputs, cached)
        out = [r.token for r in generate_step(model, vp.feed, cache, params=params, vision=vp)]
        return out, cached, vp, ids, inputs

    ids1, in1, key1 = prepare_prompt(model, first, [img])
    c = model.make_cache()
    VisionPrompt.build(model, ids1, in1).prefill(model, c, 512)
    pc.store(key1, c)
    out, cached, vp, ids2, in2 = run(second, img)
    assert cached == len(ids1) and vp.images == []  # restored: nothing to encode
    assert out == hf_greedy(hf, ids2, in2, 6)
    _, cached_other, vp_other, _, _ = run(second, picture(40, 40, 8))
    assert cached_other == 0 and len(vp_other.images) == 1


def test_batched_decode_keeps_each_rows_offset(pair):
    """Two rows with different images (different position offsets) decode in one batch exactly as alone."""
    from qwen35.cache import HybridCache

    _, model = pair
    rows = [(text(3, 1) + image_part() + text(2, 2), picture(40, 80, 1)),
            (text(7, 3) + image_part() + text(1, 4), picture(90, 30, 2))]
    caches, firsts = [], []
    for prompt, img in rows:
        ids, inputs, _ = prepare_prompt(model, prompt, [img])
        c = model.make_cache()
        firsts.append(int(VisionPrompt.build(model, ids, inputs).prefill(model, c, 512).argmax()))
        caches.append(c)
    alone = [c.snapshot() for c in caches]
    assert caches[0].rows[0].rope_delta != caches[1].rows[0].rope_delta
    batch = HybridCache.merge(caches)
    with torch.no_grad():
        both = model(torch.tensor([[firsts[0]], [firsts[1]]]), cache=batch)
        for b, snap in enumerate(alone):
            c = model.make_cache()
            c.restore(snap)
            assert torch.allclose(model(torch.tensor([[firsts[b]]]), cache=c)[0], both[b], atol=1e-5, rtol=0)


def test_text_only_checkpoint_says_no_vision_tower(tied_replica):
    model = qwen35.load_model(tied_replica[1])
    with pytest.raises(ImageError, match="no vision tower"):
        prepare_prompt(model, [1, 2, 3], [picture(8, 8, 0)])


def test_placeholder_count_must_match_the_images(pair):
    _, model = pair
    with pytest.raises(ImageError, match=r"1 image placeholder\(s\) \(<\|image_pad\|>\) for 2 image"):
        prepare_prompt(model, [1, START, PAD, END], [picture(8, 8, 0), picture(8, 8, 1)])
    with pytest.raises(ImageError, match="run of 3 tokens does not fit an image of 16 tokens"):
        prepare_prompt(model, [1, START, PAD, PAD, PAD, END], [picture(32, 32, 0)])


def test_video_placeholders_must_match_the_videos(pair):
    """Each kind of placeholder is counted against its own inputs, whatever the other kind holds: a
    <|video_pad|> with only pictures was an IndexError (pop from empty list) halfway through the prompt."""
    from qwen35.video_input import Video

    _, model = pair
    vpad = VISION_TOKENS["video_token_id"]
    video = [START, vpad, END]
    clip = Video([picture(24, 40, i) for i in range(4)], fps=2)

    def encode(text):
        return [ord(c) % 300 for c in text]

    def refused(ids, images, videos, match):
        with pytest.raises(ImageError, match=match):
            prepare_prompt(model, ids, images, videos=videos, encode=encode)

    no_video = r"1 video placeholder\(s\) \(<\|video_pad\|>\) for 0 video\(s\); put one \{'type': 'video'\}"
    refused([1] + video + image_part() + [2], [picture(20, 20, 0)], [], no_video)
    refused([1] + image_part() + video + [2], [picture(20, 20, 0)], [], no_video)
    refused([1] + image_part() + video, [], [clip], r"1 image placeholder\(s\) \(<\|image_pad\|>\) for 0 image")
    refused([1] + video + video, [], [clip], r"2 video placeholder\(s\) \(<\|video_pad\|>\) for 1 video")
    refused([1] + video, [], [clip, clip], r"1 video placeholder\(s\) \(<\|video_pad\|>\) for 2 video")
    refused([1, 2] + image_part(), [picture(20, 20, 0)], [clip], r"0 video placeholder\(s\)")
    refused([1, START, vpad, vpad, vpad, END], [], [clip], r"one <\|video_pad\|> .*not a run of 3")
    with pytest.raises(ImageError, match="needs the tokenizer"):
        prepare_prompt(model, [1] + video, [], videos=[clip])
    _, inputs, _ = prepare_prompt(model, [1] + video + image_part(), [picture(20, 20, 0)], videos=[clip],
                                  encode=encode)
    assert [i.token for i in inputs] == [vpad, vpad, PAD]  # 4 frames: 2 temporal patches, then the picture


def test_chat_session_takes_a_typed_pad_as_text(vision_chat_model):
    """`qwen35 chat`, the user typing <|video_pad|> or <|image_pad|>: typed text is text in a chat turn (as the
    server encodes it), so the question is answered, beside a picture or without one; it had been a placeholder
    (an IndexError, then an ImageError). A raw prompt (no chat template) still spells placeholders, so a
    typed pad with no picture is refused there (it would have been fed as a picture with no pixels)."""
    from qwen35.session import ChatSession

    _, path = vision_chat_model
    model, tok = qwen35.load(path, dtype=torch.float32)
    s = ChatSession(model, tok, enable_thinking=False, params=SamplingParams(temperature=0.0, max_tokens=2))
    seen = []
    lookup = s.prompt_cache.lookup
    s.prompt_cache.lookup = lambda ids: seen.append(list(ids)) or lookup(ids)
    assert len(list(s.send("what does <|video_pad|> mean?", images=[picture(40, 64, 0)]))) > 0
    video_pad = model.visual.config.video_token_id
    assert video_pad not in seen[-1]  # the typed pad is characters
    for pad in ("<|image_pad|>", "<|video_pad|>"):
        assert len(list(s.send(f"what does {pad} mean?"))) > 0
        with pytest.raises(ImageError, match=r"1 (image|video) placeholder\(s\) .* for 0 (image|video)\(s\)"):
            qwen35.generate(model, tok, f"what does {pad} mean?", SamplingParams(max_tokens=2))
    assert len(s.messages) == 6


# ---- text level: qwen35.load + stream_generate(images=...), and `qwen35 generate --image` ----

QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                         {"type": "text", "text": "What differs between these pictures?"}]}]


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    d = tmp_path_factory.mktemp("pictures")
    picture(40, 72, 1).save(d / "a.png")
    picture(56, 40, 2).convert("RGBA").save(d / "b.png")
    return [d / "a.png", d / "b.png"]


def test_stream_generate_with_images_matches_transformers(vision_chat_model, pictures):
    hf, path = vision_chat_model
    model, tok = qwen35.load(path, dtype=torch.float32)
    prompt = tok.chat_template.render(QUESTION, add_generation_prompt=True, enable_thinking=False)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    out = list(qwen35.stream_generate(model, tok, prompt, params, images=[str(p) for p in pictures]))
    ids, inputs, _ = prepare_prompt(model, tok.encode(prompt), pictures)
    assert out[-1].prompt_tokens == len(ids) > 2 * 3
    ids_t = torch.tensor([ids])
    kw = {"mm_token_type_ids": (ids_t == 248056).int(), "pixel_values": torch.cat([i.patches for i in inputs]),
          "image_grid_thw": torch.tensor([i.grid for i in inputs])}
    with torch.no_grad():
        ref = hf.float().generate(ids_t, max_new_tokens=8, do_sample=False, eos_token_id=None, **kw)
    assert [r.token for r in out] == ref[0, len(ids):].tolist()


def test_prompt_cache_reuses_the_image_prefix(vision_chat_model, pictures, monkeypatch):
    """A follow-up question about the same pictures restores the first turn's snapshot (no re-encoding, and
    no patches made: only the pictures' hashes and grids are needed to find the prefix)."""
    from qwen35.vision_input import ImageProcessor

    patched = []
    frames_to_patches = ImageProcessor.frames_to_patches
    monkeypatch.setattr(ImageProcessor, "frames_to_patches",
                        lambda self, frames: patched.append(1) or frames_to_patches(self, frames))
    _, path = vision_chat_model
    model, tok = qwen35.load(path, dtype=torch.float32)
    pc = PromptCache(model)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    first = tok.chat_template.render(QUESTION, add_generation_prompt=True, enable_thinking=False)
    r1 = list(qwen35.stream_generate(model, tok, first, params, prompt_cache=pc, images=pictures))
    assert len(patched) == 2
    answer = "".join(r.text for r in r1)
    second = first + answer + "<|im_end|>\n<|im_start|>user\nAnd the colours?<|im_end|>\n<|im_start|>assistant\n"
    calls = []
    tower = model.visual
    forward = tower.forward
    tower.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    warm = list(qwen35.stream_generate(model, tok, second, params, prompt_cache=pc, images=pictures))
    tower.forward = forward
    assert warm[-1].cached_tokens > 2 * 3 and calls == [] and len(patched) == 2
    cold = list(qwen35.stream_generate(model, tok, second, params, images=pictures))
    assert [r.token for r in warm] == [r.token for r in cold]


def run_cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "qwen35", "generate", *args], capture_output=True, text=True, check=False,
                          timeout=300)


def test_cli_generate_with_images(vision_chat_model, pictures):
    import json

    _, path = vision_chat_model
    p = run_cli(str(path), "--image", str(pictures[0]), "--image", str(pictures[1]), "--chat", "--prompt",
                "What differs between these pictures?", "--temperature", "0", "--max-tokens", "6", "--ignore-eos",
                "--dtype", "float32", "--threads", "1", "--json", "--no-think")
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout.strip().splitlines()[-1])
    model, tok = qwen35.load(path, dtype=torch.float32)
    prompt = tok.chat_template.render(QUESTION, add_generation_prompt=True, enable_thinking=False)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    ref = [r.token for r in qwen35.stream_generate(model, tok, prompt, params, images=pictures)]
    assert got["token_ids"] == ref


def test_cli_image_errors(pictures, tmp_path):
    p = run_cli("--image", str(pictures[0]), "--prompt", "hi", "--max-tokens", "2")  # the bundled text model
    assert p.returncode == 1 and "no vision tower" in p.stderr
    (tmp_path / "notes.txt").write_text("not a picture")
    p = run_cli("--image", str(tmp_path / "notes.txt"), "--prompt", "hi", "--max-tokens", "2")
    assert p.returncode == 1 and "notes.txt is not an image" in p.stderr
    pasted = "iVBORw0KGgo" + "A" * 400  # base64 pasted as a path: too long a file name, once a traceback
    p = run_cli("--image", pasted, "--prompt", "hi", "--max-tokens", "2")
    assert p.returncode == 1 and p.stderr == (
        f"qwen35: error: cannot use '{pasted[:60]}... (411 characters)' as an image path (File name too long); "
        "this looks like base64 image data: give it as a data URL, data:image/png;base64,<data>\n")


def test_chat_image_command(vision_chat_model, pictures, monkeypatch, capsys):
    """`/image PATH` in qwen35 chat: the picture goes with the next message, whose answer is the library's;
    the turn after it reuses the cached prefix (picture included); a bad path is a message, not a crash."""
    import sys
    from dataclasses import replace

    from test_cli import STATS, ScriptedStdin

    from qwen35 import cli
    from qwen35.commands import chat
    from qwen35.sampling import preset

    _, path = vision_chat_model
    model, tok = qwen35.load(path, dtype=torch.float32)
    monkeypatch.setattr(chat, "load_from_args", lambda args: (model, tok))
    lines = [f"/image {pictures[0]}", "/image /nowhere/x.png", "What is it?", "And now?", "/quit"]
    monkeypatch.setattr(sys, "stdin", ScriptedStdin(lines))
    code = cli.main(["chat", str(path), "--max-tokens", "5", "--temperature", "0", "--no-think"])
    out = capsys.readouterr().out
    stats = [tuple(map(int, m)) for m in STATS.findall(out)]
    assert code == 0 and len(stats) == 2
    assert f"(image {pictures[0]} attached to your next message (1 waiting))" in out
    assert "(cannot use the image: image not found: /nowhere/x.png)" in out
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = tok.chat_template.render(msgs, add_generation_prompt=True, enable_thinking=False)
    params = replace(preset(False), temperature=0, max_tokens=5)  # what the REPL samples with
    expected = "".join(r.text for r in qwen35.stream_generate(model, tok, prompt, params, images=[pictures[0]]))
    assert f">>> {expected}\n[5 tokens;" in out
    (_, prompt1, _, _), (_, prompt2, prefilled2, reused2) = stats
    image_tokens = model.visual.processor.num_tokens(40, 72)
    assert prompt1 > image_tokens and reused2 >= prompt1 and prefilled2 == prompt2 - reused2


# ---- video: a list of frames (or an animated image), one temporal patch per <|video_pad|> run ----

def test_video_sampling_sizes_and_timestamps_follow_the_reference_rules():
    from qwen35.video_input import resized_size, sample_indices, timestamps

    # k = int(n / fps * 2) clamped to [4, 768] and n; round(linspace(0, n - 1, k))
    assert sample_indices(100, 25) == [0, 14, 28, 42, 57, 71, 85, 99]
    assert sample_indices(5, 4) == [0, 1, 3, 4]  # 2 -> at least 4
    assert sample_indices(3, 30) == [0, 1, 2]  # never more than there are
    assert sample_indices(48, None) == [0, 16, 31, 47]  # unknown rate: 24 fps, so 4 frames
    assert timestamps([0, 14, 28, 42, 57], 25) == pytest.approx([0.28, 1.4, 2.28])  # last frame repeated
    # 8 x 736 x 1280 > 768*32*32: beta = sqrt(8*720*1280 / 786432) = 3.06, floor(720/beta/32)*32 = 224
    assert resized_size(8, 720, 1280) == (224, 416)
    # 4 x 32 x 64 < 128*32*32: beta = sqrt(131072 / (4*40*56)) = 3.82, ceil(40*beta/32)*32 = 160
    assert resized_size(4, 40, 56) == (160, 224)
    assert resized_size(4, 40, 56, factor=8) == (40, 56)


def test_animated_image_is_a_video(tmp_path):
    from qwen35.video_input import Video

    frames = [picture(20, 30, i) for i in range(6)]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=250, loop=0)
    v = Video.open(tmp_path / "clip.gif")
    assert len(v.frames) == 6 and v.fps == pytest.approx(4.0) and v.frames[0].size == (30, 20)


def test_animated_image_decodes_only_the_sampled_frames(tmp_path, monkeypatch):
    """Video.open keeps no frame (it converted every one to RGB: GBs for a long 1080p GIF); the frames a
    clip samples, its patches and its rate are what converting them all up front gave."""
    from PIL import ImageSequence

    from qwen35 import video_input
    from qwen35.video_input import AnimatedFrames, Video, preprocess_video
    from qwen35.vision_input import ImageProcessor, to_rgb

    frames = [picture(24, 40, i).convert("RGBA") for i in range(40)]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=[50, 30, 70, 50] * 10,
                   loop=0, disposal=2)
    with Image.open(tmp_path / "clip.gif") as img:  # every frame up front, as Video.open did
        eager = Video([to_rgb(f.copy()) for f in ImageSequence.Iterator(img)], fps=20.0)
    converted, read = [], []
    monkeypatch.setattr(video_input, "to_rgb", lambda img: converted.append(1) or to_rgb(img))
    getitem = AnimatedFrames.__getitem__
    monkeypatch.setattr(AnimatedFrames, "__getitem__", lambda self, i: read.append(i) or getitem(self, i))
    lazy = Video.open(tmp_path / "clip.gif")
    assert converted == [] and len(lazy.frames) == 40 and lazy.fps == pytest.approx(eager.fps)
    ours, grid, seconds, key = preprocess_video(lazy, ImageProcessor())
    assert read == video_input.sample_indices(40, 20.0) == [0, 13, 26, 39]  # 2 s at 2 fps: 4 of the 40 frames
    want = preprocess_video(eager, ImageProcessor())
    assert torch.equal(ours, want[0]) and (grid, seconds, key) == want[1:]
    assert all(np.array_equal(np.asarray(lazy.frames[i]), np.asarray(eager.frames[i])) for i in (39, 5, 0, 21))


def test_video_logits_match_transformers(pair):
    """Frames -> temporal patches with timestamps in the prompt; logits equal transformers' given the same
    pixel_values_videos (its reference resize needs torchvision, which does not install here)."""
    from qwen35.video_input import Video

    hf, model = pair
    video_pad = VISION_TOKENS["video_token_id"]
    clip = Video([picture(40, 56, i) for i in range(5)], fps=4)

    def encode(text):
        return [ord(c) % 300 for c in text]

    ids, inputs, _ = prepare_prompt(model, text(4, 1) + [START, video_pad, END] + text(5, 2), [], videos=[clip],
                                    encode=encode)
    assert [i.grid for i in inputs] == [(1, 10, 14)] * 2  # 4 sampled frames -> 2 temporal patches of 10 x 14
    assert ids.count(video_pad) == 2 * 35 and ids[5:5 + len("<0.1 seconds>")] == encode("<0.1 seconds>")
    vp = VisionPrompt(list(ids), inputs, (PAD, video_pad))
    pos, _ = rope_positions(ids, inputs, (PAD, video_pad), 0)
    with torch.no_grad():
        ours = model(torch.tensor([ids]), positions=pos[:, None], inputs_embeds=vp.embeddings(model))
    ids_t = torch.tensor([ids])
    kw = {"mm_token_type_ids": (ids_t == video_pad).int() * 2, "video_grid_thw": torch.tensor([[2, 10, 14]]),
          "pixel_values_videos": torch.cat([i.patches for i in inputs])}
    assert_logits_match_oracle(ours, hf, ids_t, **kw)


def test_stream_generate_with_a_video_matches_transformers(vision_chat_model, tmp_path):
    """An animated GIF through stream_generate(videos=): the real tokenizer writes the timestamps; the greedy
    answer equals transformers' on the same ids and pixel_values_videos."""
    hf, path = vision_chat_model
    model, tok = qwen35.load(path, dtype=torch.float32)
    frames = [picture(24, 40, i) for i in range(7)]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=500, loop=0)
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    prompt = tok.chat_template.render(msgs, add_generation_prompt=True, enable_thinking=False)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    out = list(qwen35.stream_generate(model, tok, prompt, params, videos=[tmp_path / "clip.gif"]))
    ids, inputs, _ = prepare_prompt(model, tok.encode(prompt), [], videos=[tmp_path / "clip.gif"], encode=tok.encode)
    # 7 frames of 0.5 s at 2 fps: all 7, padded to 8 (the last repeated), 4 temporal patches at 0.25 .. 3.0 s
    assert len(inputs) == 4 and "<0.2 seconds><|vision_start|>" in tok.decode(ids) and "<3.0 seconds>" in tok.decode(ids)
    t, h, w = len(inputs), *inputs[0].grid[1:]
    ids_t = torch.tensor([ids])
    kw = {"mm_token_type_ids": (ids_t == 248057).int() * 2, "video_grid_thw": torch.tensor([[t, h, w]]),
          "pixel_values_videos": torch.cat([i.patches for i in inputs])}
    with torch.no_grad():
        ref = hf.float().generate(ids_t, max_new_tokens=6, do_sample=False, eos_token_id=None, **kw)
    assert [r.token for r in out] == ref[0, len(ids):].tolist()
