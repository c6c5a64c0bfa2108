"""The vision tower as llama.cpp's mmproj GGUF: our file is the converter's (`convert_hf_to_gguf.py --mmproj`)
key for key and byte for byte, export -> load gives back the checkpoint's image-prompt logits exactly, `qwen35
export` writes it beside the text GGUF and loading a GGUF finds it there (mmproj=False / --no-mmproj: not), a
wrong or mismatched file is a named error (a found one too), `qwen35 info` describes one and `qwen35 verify`
checks one, and llama.cpp's libmtmd runs our text GGUF + mmproj to qwen35's numbers.

Tolerances against llama.cpp (f32 files, its tower without flash attention; measured on this replica, which is
the one the study calibrated them on): image embeddings max |d| 3.1e-3 (of values up to 6.1: its merger's GELU
is the tanh form, 1.3e-3 of it, and its fp16 GELU table the rest), last-token log-probs 7e-4, 12 of 12 greedy
tokens equal. The bounds below allow about 3x."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import replica
import torch

import qwen35
from qwen35 import CheckpointError
from qwen35.gguf import export_mmproj, mmproj_path, open_gguf
from qwen35.gguf import mmproj as mm
from qwen35.multimodal import VisionInput, VisionPrompt, prepare_prompt
from qwen35.sampling import SamplingParams
from qwen35.weights import load_model

BUNDLED = Path(__file__).resolve().parent.parent / "qwen35" / "assets" / "model"
PROMPT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe this.<|im_end|>\n"
          "<|im_start|>assistant\n")
# 24 x 40 pixels = a 6 x 10 patch grid, 3 x 5 merged tokens: sides that neither engine resizes
RGB = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """A composite replica (two-block tower, 64-wide text model) with the bundled tokenizer, whose placeholder
    tokens are the ids the replica's config names (llama.cpp finds them by their text)."""
    d = tmp_path_factory.mktemp("mmproj") / "vlm"
    replica.build_vlm(d, seed=3, vision={**replica.VISION, "depth": 2, "out_hidden_size": 64}, vocab_size=8192,
                      linear_value_head_dim=16, eos_token_id=2,
                      tokens={"image_token_id": 12, "video_token_id": 13, "vision_start_token_id": 9,
                              "vision_end_token_id": 10})
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / f).write_bytes((BUNDLED / f).read_bytes())
    return d


@pytest.fixture(scope="module")
def exported(vlm, tmp_path_factory):
    """{file type: (text GGUF, mmproj)} of `qwen35 export vlm`."""
    from qwen35.cli import main

    out = {}
    for kind in ("f32", "bf16"):
        d = tmp_path_factory.mktemp(f"export-{kind}")
        assert main(["export", str(vlm), str(d / "m.gguf"), "--type", kind]) == 0
        out[kind] = (d / "m.gguf", d / "mmproj-m.gguf")
    return out


def image(model) -> VisionInput:
    """RGB as an image input at its own size (no resize): the same patches whatever the processor's pixel limits."""
    p = model.visual.processor
    patches, grid = p.image_patches(RGB)
    return VisionInput(patches, grid, "0" * 64, p.merge_size, model.visual.config.image_token_id)


def image_logits(model, tok) -> torch.Tensor:
    ids, inputs, _ = prepare_prompt(model, tok.encode(PROMPT), [image(model)])
    return VisionPrompt.build(model, ids, inputs, 0).prefill(model, model.make_cache(batch_size=1), 512)[0]


@pytest.mark.parametrize("kind", ["f32", "bf16"])
def test_export_then_load_gives_the_checkpoint_logits(vlm, exported, kind):
    """The text GGUF + its mmproj load as the checkpoint's model: the tower's parameters equal (dtype included),
    the processor's patching is the file's, and an image prompt's logits are identical."""
    dtype = torch.float32 if kind == "f32" else torch.bfloat16
    ref, tok = qwen35.load(vlm, dtype=dtype, kernels=False)
    text, proj = exported[kind]
    back, tok2 = qwen35.load(text, dtype=dtype, kernels=False, mmproj=proj)
    assert back.visual.config == ref.visual.config  # the placeholder ids found in the GGUF's vocabulary
    a, b = dict(ref.visual.named_parameters()), dict(back.visual.named_parameters())
    assert a.keys() == b.keys()
    assert [n for n in a if a[n].dtype != b[n].dtype or not torch.equal(a[n], b[n])] == []
    pa, pb = ref.visual.processor, back.visual.processor
    assert (pb.patch_size, pb.temporal_patch_size, pb.merge_size, pb.image_mean, pb.image_std) == (
        pa.patch_size, pa.temporal_patch_size, pa.merge_size, pa.image_mean, pa.image_std)
    assert (pb.min_pixels, pb.max_pixels) == (65536, 16777216)  # not in the file: the Qwen3.5 defaults
    assert torch.equal(image_logits(ref, tok), image_logits(back, tok2))
    # what writes a checkpoint of the model reads the tower's config from the model's config
    assert back.config.vision_config["depth"] == 2 and back.config.vision_config["image_token_id"] == 12


def test_export_command_writes_the_mmproj_beside_the_gguf(vlm, exported, tmp_path, capsys):
    """`qwen35 export` of a vision checkpoint: mmproj-<stem>.gguf beside OUT (its path printed), --mmproj PATH
    elsewhere, --no-mmproj none; a GGUF source has no tower, said, and --mmproj for it is refused."""
    from qwen35.cli import main

    text, proj = exported["f32"]
    f = open_gguf(proj)
    assert (f.get("general.architecture"), f.get("general.type"), f.get("general.name")) == ("clip", "mmproj", "m")
    assert mmproj_path(text) == proj
    assert main(["export", str(vlm), str(tmp_path / "a.gguf"), "--mmproj", str(tmp_path / "tower.gguf")]) == 0
    assert f"wrote {tmp_path / 'tower.gguf'} (the vision tower" in capsys.readouterr().out
    assert not (tmp_path / "mmproj-a.gguf").exists()
    assert main(["export", str(vlm), str(tmp_path / "b.gguf"), "--no-mmproj"]) == 0
    assert sorted(p.name for p in tmp_path.glob("*b.gguf")) == ["b.gguf"]
    capsys.readouterr()
    # a GGUF source loads with the mmproj found beside it (load_model), so its tower goes on beside OUT
    assert main(["export", str(text), str(tmp_path / "c.gguf")]) == 0
    assert f"wrote {tmp_path / 'mmproj-c.gguf'} (the vision tower" in capsys.readouterr().out
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "m.gguf").write_bytes(text.read_bytes())
    assert main(["export", str(alone / "m.gguf"), str(tmp_path / "c2.gguf")]) == 0
    assert "is a GGUF with no mmproj-*.gguf beside it: no vision tower written" in capsys.readouterr().out
    assert main(["export", str(alone / "m.gguf"), str(tmp_path / "d.gguf"), "--mmproj", str(tmp_path / "d-mm.gguf")]) == 1
    assert "is a GGUF with no mmproj file beside it: there is no vision tower to write" in capsys.readouterr().err
    assert not (tmp_path / "d.gguf").exists()  # refused before anything was written
    # a GGUF with its mmproj beside it: --mmproj names where the tower goes; --no-mmproj neither reads nor writes
    # it, even where the file beside does not fit (it had been loaded, and refused, anyway)
    assert main(["export", str(text), str(tmp_path / "f.gguf"), "--mmproj", str(tmp_path / "f-mm.gguf")]) == 0
    assert f"wrote {tmp_path / 'f-mm.gguf'} (the vision tower" in capsys.readouterr().out
    (alone / "mmproj-m.gguf").write_bytes(b"GGUF not really")
    assert main(["export", str(alone / "m.gguf"), str(tmp_path / "g.gguf"), "--no-mmproj"]) == 0
    assert sorted(p.name for p in tmp_path.glob("*g.gguf")) == ["g.gguf"]
    assert main(["export", str(vlm), str(tmp_path / "e.gguf"), "--mmproj", str(tmp_path / "e.gguf")]) == 1


@pytest.mark.parametrize("kind,matrices,file_type", [("q8_0", "Q8_0", 7), ("q4_k_m", "BF16", 32)])
def test_quantized_types(vlm, tmp_path, kind, matrices, file_type):
    """q8_0: Q8_0 matrices, read back as their dequantized values; q4_0 / q4_k_m keep the tower BF16 (llama.cpp's
    converter writes no 4-bit tower). Biases, norms, the patch kernel and the positions stay F32."""
    from gguf.quants import dequantize

    model = load_model(vlm, dtype=torch.bfloat16, kernels=False)
    export_mmproj(model, tmp_path / "mm.gguf", kind)
    f = open_gguf(tmp_path / "mm.gguf")
    assert f.get("general.file_type") == file_type
    types = {n: t.tensor_type.name for n, t in f.tensors.items()}
    assert types["v.blk.1.attn_qkv.weight"] == types["mm.2.weight"] == matrices
    assert types["v.patch_embd.weight.1"] == types["v.position_embd.weight"] == types["v.blk.0.ln1.weight"] == "F32"
    tower = mm.load_mmproj(tmp_path / "mm.gguf", model.config, torch.float32, vlm)
    t = f.tensors["v.blk.1.attn_qkv.weight"]
    want = torch.from_numpy(dequantize(np.asarray(t.data), t.tensor_type)).reshape(96, 32)
    assert torch.equal(tower.blocks[1].attn.qkv.weight, want)


def test_tensor_plan_follows_the_converter_fallback():
    """A row that Q8_0 cannot cut into 32-blocks (the 9B tower's 4304-wide MLP) is F16, as the converter falls
    back; the rest of the plan is the one llama.cpp reads."""
    shapes = {"blocks.0.mlp.linear_fc1.weight": (4304, 1152), "blocks.0.mlp.linear_fc2.weight": (1152, 4304),
              "patch_embed.proj.weight": (1152, 3, 2, 16, 16), "pos_embed.weight": (2304, 1152)}
    assert mm.tensor_plan(shapes, "q8_0") == [
        ("blocks.0.mlp.linear_fc1.weight", "v.blk.0.ffn_up.weight", "Q8_0"),
        ("blocks.0.mlp.linear_fc2.weight", "v.blk.0.ffn_down.weight", "F16"),
        ("patch_embed.proj.weight", "v.patch_embd.weight", "F32"),
        ("patch_embed.proj.weight", "v.patch_embd.weight.1", "F32"),
        ("pos_embed.weight", "v.position_embd.weight", "F32")]


def test_mismatched_or_foreign_files_are_named_errors(vlm, exported, tmp_path, monkeypatch):
    text, proj = exported["f32"]
    model = load_model(vlm, dtype=torch.float32, kernels=False)
    with pytest.raises(CheckpointError, match=rf"{text}: not an mmproj file \(GGUF architecture 'qwen35' \(a text "):
        load_model(text, mmproj=text)
    with pytest.raises(CheckpointError, match=rf"{proj}: GGUF architecture is 'clip' \(a vision tower: an mmproj"):
        load_model(proj)
    with pytest.raises(CheckpointError, match="GGUF file not found: .*nowhere.gguf"):
        load_model(text, mmproj=tmp_path / "nowhere.gguf")
    # another model's tower: it projects to another width
    other = SimpleNamespace(visual=model.visual, config=SimpleNamespace(hidden_size=128, rms_norm_eps=1e-6))
    wide = export_mmproj(other, tmp_path / "wide.gguf", "f32")
    with pytest.raises(CheckpointError, match=rf"{wide}: this mmproj projects to 128 dims .* the text model's hidden "
                                              "size is 64: it belongs to another model"):
        load_model(text, mmproj=wide)
    # another family's projector
    monkeypatch.setattr(mm, "PROJECTOR", "qwen2vl_merger")
    foreign = export_mmproj(model, tmp_path / "foreign.gguf", "f32")
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match=rf"{foreign}: mmproj projector type 'qwen2vl_merger'; qwen35 runs "):
        load_model(text, mmproj=foreign)
    # a tensor short
    rewrite(proj, tmp_path / "short.gguf", drop="mm.2.bias")
    with pytest.raises(CheckpointError, match=r"short.gguf: missing tensor 'mm.2.bias' for a tower of 2 blocks"):
        load_model(text, mmproj=tmp_path / "short.gguf")
    with pytest.raises(CheckpointError, match=rf"{proj}: the model already has a vision tower"):
        load_model(vlm, mmproj=proj)


def rewrite(src: Path, out: Path, drop: str | None = None, reshape: dict | None = None) -> Path:
    """A copy of the mmproj `src` (the clip keys load_mmproj reads, every tensor as F32) without tensor `drop`
    and with the tensors in `reshape` (name -> torch-order shape) of another shape."""
    from gguf import GGUFWriter

    f = open_gguf(src)
    w = GGUFWriter(out, "clip")
    for k in ("general.type", "clip.has_vision_encoder", "clip.projector_type"):
        w.add_string(k, f.get(k)) if isinstance(f.get(k), str) else w.add_bool(k, f.get(k))
    for k in ("projection_dim", "patch_size", "embedding_length", "feed_forward_length", "block_count",
              "attention.head_count", "spatial_merge_size"):
        w.add_uint32(f"clip.vision.{k}", f.get(f"clip.vision.{k}"))
    w.add_array("clip.vision.image_mean", f.get("clip.vision.image_mean"))
    w.add_array("clip.vision.image_std", f.get("clip.vision.image_std"))
    for n, t in f.tensors.items():
        if n != drop:
            a = np.array(t.data)
            w.add_tensor(n, np.zeros((reshape or {})[n], np.float32) if n in (reshape or {}) else a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def test_cli_generate_takes_mmproj(exported, tmp_path):
    """`qwen35 generate M.gguf --mmproj MMPROJ --image PNG`: the tokens the API gives for the same files."""
    from PIL import Image

    text, proj = exported["f32"]
    png = tmp_path / "p.png"
    Image.fromarray(np.tile(RGB, (11, 7, 1))[:256, :256]).save(png)  # 256 x 256: the default pixel floor
    args = ["--prompt", "<|vision_start|><|image_pad|><|vision_end|>Describe", "--temperature", "0",
            "--max-tokens", "4", "--ignore-eos", "--dtype", "float32", "--threads", "1", "--json"]
    p = subprocess.run([sys.executable, "-m", "qwen35", "generate", str(text), "--mmproj", str(proj), "--image",
                        str(png), *args], capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr
    model, tok = qwen35.load(text, dtype=torch.float32, mmproj=proj)
    ref = [r.token for r in qwen35.stream_generate(model, tok, args[1], SamplingParams(temperature=0, max_tokens=4,
                                                                                      ignore_eos=True), images=[png])]
    assert json.loads(p.stdout.strip().splitlines()[-1])["token_ids"] == ref


# ---- found beside the GGUF; described by `qwen35 info`, checked by `qwen35 verify` ----
@pytest.fixture(scope="module")
def wide(vlm, tmp_path_factory):
    """An mmproj of another model: the replica's tower, projecting to 128 dims (the text model has 64)."""
    model = load_model(vlm, dtype=torch.float32, kernels=False)
    other = SimpleNamespace(visual=model.visual, config=SimpleNamespace(hidden_size=128, rms_norm_eps=1e-6))
    return export_mmproj(other, tmp_path_factory.mktemp("wide") / "wide.gguf", "f32")


def beside(text: Path, folder: Path, mmproj: Path | None) -> Path:
    """A copy of the text GGUF in `folder`, with `mmproj` copied beside it as its mmproj-<stem>.gguf."""
    folder.mkdir()
    (folder / text.name).write_bytes(text.read_bytes())
    if mmproj is not None:
        mmproj_path(folder / text.name).write_bytes(mmproj.read_bytes())
    return folder / text.name


def test_load_finds_the_mmproj_beside_a_gguf(exported, caplog):
    """load_model / qwen35.load of a GGUF without mmproj=: the mmproj-<stem>.gguf beside it is attached (one info
    line names it), the same tower as naming it; mmproj=False loads the text model alone."""
    text, proj = exported["f32"]
    with caplog.at_level("INFO", logger="qwen35"):
        model = load_model(text, kernels=False)
    named = load_model(text, kernels=False, mmproj=proj)
    assert [r.getMessage() for r in caplog.records if "mmproj" in r.getMessage()] == [
        f"mmproj: attached {proj}, found beside m.gguf (mmproj=False or --no-mmproj: the text model alone)"]
    a, b = dict(model.visual.named_parameters()), dict(named.visual.named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert model.config.vision_config == named.config.vision_config
    caplog.clear()
    with caplog.at_level("INFO", logger="qwen35"):
        alone, _ = qwen35.load(text, kernels=False, mmproj=False)
    assert getattr(alone, "visual", None) is None and alone.config.vision_config is None
    assert "mmproj" not in caplog.text
    with pytest.raises(TypeError, match="mmproj= takes a path, None"):
        load_model(text, mmproj=True)


def test_which_file_is_found(vlm, tmp_path):
    """mmproj-<stem>.gguf in the GGUF's own folder; for any part of a split <base>-0000K-of-0000N.gguf,
    mmproj-<base>.gguf; nothing for a checkpoint directory (it carries its own tower) or where none is."""
    for n in ("s-00001-of-00002.gguf", "s-00002-of-00002.gguf", "mmproj-s.gguf", "t.gguf", "ck/config.json",
              "mmproj-ck.gguf", "mmproj-vlm.gguf"):
        (tmp_path / n).parent.mkdir(exist_ok=True)
        (tmp_path / n).touch()
    assert mm.find_mmproj(tmp_path / "s-00001-of-00002.gguf") == tmp_path / "mmproj-s.gguf"
    assert mm.find_mmproj(tmp_path / "s-00002-of-00002.gguf") == tmp_path / "mmproj-s.gguf"
    assert mm.find_mmproj(tmp_path / "t.gguf") is None
    assert mm.find_mmproj(tmp_path / "ck") is None
    assert mm.find_mmproj(tmp_path / "mmproj-s.gguf") is None  # (no mmproj-mmproj-s.gguf)
    assert mm.find_mmproj(vlm) is None


def test_a_found_mmproj_that_does_not_fit_is_an_error(exported, wide, tmp_path):
    """Another model's tower beside the GGUF: an error naming the file found and the way out (never skipped);
    mmproj=False loads the text model, and an mmproj named explicitly wins without the found one being read."""
    text, proj = exported["f32"]
    m = beside(text, tmp_path / "mismatch", wide)
    with pytest.raises(CheckpointError, match=rf"{m.parent / 'mmproj-m.gguf'}: this mmproj projects to 128 dims .* "
                                              r"\(mmproj-m.gguf was found beside m.gguf as its mmproj: pass "
                                              r"mmproj=False, or --no-mmproj, to load the text model alone"):
        qwen35.load(m, kernels=False)
    assert getattr(load_model(m, kernels=False, mmproj=False), "visual", None) is None
    assert load_model(m, kernels=False, mmproj=proj).visual is not None
    # a broken file found is an error too (not GGUF at all)
    (m.parent / "mmproj-m.gguf").write_bytes(b"not a gguf")
    with pytest.raises(CheckpointError, match=r"mmproj-m.gguf .*was found beside m.gguf as its mmproj"):
        load_model(m, kernels=False)


def test_no_mmproj_flag(exported, wide, tmp_path):
    """--mmproj PATH / --no-mmproj on the commands that load a model: one dest (a path, False, or None to find
    it), not both; `qwen35 generate` refuses a found mmproj that does not fit, naming --no-mmproj, and runs with it."""
    import argparse

    from qwen35.commands.common import add_model_args

    p = argparse.ArgumentParser()
    add_model_args(p)
    assert p.parse_args(["m.gguf"]).mmproj is None
    assert p.parse_args(["m.gguf", "--no-mmproj"]).mmproj is False
    assert p.parse_args(["m.gguf", "--mmproj", "x.gguf"]).mmproj == Path("x.gguf")
    with pytest.raises(SystemExit):
        p.parse_args(["m.gguf", "--mmproj", "x.gguf", "--no-mmproj"])
    m = beside(exported["f32"][0], tmp_path / "mismatch", wide)
    args = [sys.executable, "-m", "qwen35", "generate", str(m), "--prompt", "Hi", "--max-tokens", "2",
            "--temperature", "0", "--threads", "1", "--dtype", "float32"]
    p = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 1 and "mmproj-m.gguf was found beside m.gguf" in p.stderr and "--no-mmproj" in p.stderr
    p = subprocess.run([*args, "--no-mmproj"], capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr


def info(capsys, *argv) -> tuple[int, str]:
    from qwen35.cli import main

    rc = main(["info", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_info_describes_an_mmproj_and_names_the_one_found(exported, wide, tmp_path, capsys):
    text, proj = exported["f32"]
    rc, out = info(capsys, proj)
    assert rc == 0, out
    lines = {ln[:13].strip(): ln[13:] for ln in out.splitlines() if not ln.startswith(" ")}
    assert lines["mmproj"].startswith(str(proj))
    assert lines["architecture"] == "clip (an mmproj: a vision tower), projector qwen3vl_merger, name 'm', file type F32"
    vc = replica.VISION
    assert lines["tower"] == (f"2 blocks, hidden {vc['hidden_size']}, {vc['num_heads']} heads x "
                              f"{vc['hidden_size'] // vc['num_heads']}, MLP {vc['intermediate_size']}, "
                              f"{vc['num_position_embeddings']} positions ({round(vc['num_position_embeddings']**0.5)} x "
                              f"{round(vc['num_position_embeddings']**0.5)})")
    assert lines["patches"].startswith(f"{vc['patch_size']} x {vc['patch_size']} pixels x 2 frames, 2 x 2 merged")
    assert lines["projection"] == "64 dims: for a text model of hidden size 64"
    f = open_gguf(proj)
    params = sum(t.n_elements for t in f.tensors.values())
    assert lines["parameters"] == f"{params / 1e6:.1f}M"
    assert "F32" in out and "read in the model dtype" in out and "v.blk.1.attn_qkv.weight" not in out
    rc, out = info(capsys, proj, "--tensors")
    qkv = f.tensors["v.blk.1.attn_qkv.weight"]
    row = [ln.split() for ln in out.splitlines() if ln.strip().startswith("v.blk.1.attn_qkv.weight")]
    assert rc == 0 and row == [["v.blk.1.attn_qkv.weight", "F32", "x".join(str(int(s)) for s in qkv.shape),
                                f"{qkv.n_bytes:,d}", "bytes"]]
    rc, out = info(capsys, proj, "--context", "8")
    assert rc == 1 and "is an mmproj (a vision tower): --context describes a text model" in out
    # the text GGUF names the mmproj it would attach, or why it would refuse the one beside it
    rc, out = info(capsys, text)
    assert rc == 0 and "mmproj       mmproj-m.gguf beside it, attached at load (--no-mmproj skips it): a 2-block" in out
    rc, out = info(capsys, beside(text, tmp_path / "mismatch", wide))
    assert rc == 0 and ("mmproj       mmproj-m.gguf beside it does not fit this model, so loading refuses it "
                        "(--no-mmproj: the text model alone): ") in out and "projects to 128 dims" in out
    rc, out = info(capsys, beside(text, tmp_path / "none", None))
    assert rc == 0 and "mmproj " not in out


def test_verify_checks_an_mmproj(exported, wide, tmp_path, capsys):
    """`qwen35 verify MMPROJ`: OK for a good one; a truncated file, a missing tensor and a tensor of the wrong
    shape are each named. `qwen35 verify M.gguf` checks and hashes the mmproj found beside it too."""
    from qwen35.cli import main
    from qwen35.manifest import MANIFEST, read_manifest

    def verify(path):
        rc = main(["verify", str(path)])
        return rc, capsys.readouterr().out.strip().splitlines()

    proj = exported["bf16"][1]
    rc, out = verify(proj)
    assert rc == 0 and out == [(f"{proj}: OK: 1 weight file(s), {len(open_gguf(proj).tensors)} tensors, shapes as "
                                "its metadata implies (an mmproj: a vision tower); hashes not checked (no manifest: "
                                "`qwen35 verify --write-manifest` records one)")]
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(proj.read_bytes()[:-64])
    rc, out = verify(bad)
    assert rc == 1 and out[0].startswith("corrupt: ") and "file is truncated: tensor" in out[0]
    rc, out = verify(rewrite(exported["f32"][1], tmp_path / "short.gguf", drop="v.blk.0.ffn_up.bias",
                             reshape={"mm.0.weight": (5, 7)}))
    assert rc == 1 and out[:2] == [
        "missing tensor 'v.blk.0.ffn_up.bias' for a tower of 2 blocks",
        (f"tensor 'mm.0.weight' has shape [7, 5] (GGUF order), the metadata implies "
         f"{list(reversed(open_gguf(proj).tensors['mm.0.weight'].shape.tolist()))}")]
    # a text GGUF's check takes in the mmproj found beside it: against its width, and into its manifest
    m = beside(exported["bf16"][0], tmp_path / "pair", proj)
    assert main(["verify", str(m), "--write-manifest"]) == 0
    assert set(read_manifest(m.parent / MANIFEST)["files"]) == {"m.gguf", "mmproj-m.gguf"}
    capsys.readouterr()
    rc, out = verify(m)
    assert rc == 0 and out[0].startswith(f"{m}: OK: 2 weight file(s) (with mmproj-m.gguf, the mmproj found beside "
                                         "it), ") and "2 file(s) match" in out[0]
    rc, out = verify(m.parent / "mmproj-m.gguf")
    assert rc == 0 and "1 file(s) match" in out[0]
    raw = bytearray((m.parent / "mmproj-m.gguf").read_bytes())
    raw[-3] ^= 0x10
    (m.parent / "mmproj-m.gguf").write_bytes(bytes(raw))
    for path in (m, m.parent / "mmproj-m.gguf"):
        rc, out = verify(path)
        assert rc == 1 and len(out) == 2 and out[0].startswith("corrupt: mmproj-m.gguf: sha256 ")
        assert out[1] == f"{path}: 1 problem(s)"
    rc, out = verify(beside(exported["bf16"][0], tmp_path / "mismatch", wide))
    assert rc == 1 and out[0].startswith(f"config: {tmp_path / 'mismatch' / 'mmproj-m.gguf'}: this mmproj projects "
                                         "to 128 dims")


# ---- llama.cpp itself (the `llamacpp` marker: benchmarks/llamacpp.py's venv) ----
@pytest.mark.llamacpp
@pytest.mark.parametrize("kind", ["f32", "bf16", "q8_0", "q8_0-odd"])
def test_mmproj_equals_llama_cpp_converter(llamacpp, vlm, kind, tmp_path):
    """Our mmproj and `convert_hf_to_gguf.py --mmproj --outtype KIND`'s: the same keys and values, tensor names,
    shapes, types and bytes. `odd`: a tower whose MLP rows are not whole 32-blocks (Q8_0 falls back to F16)."""
    from qwen35.gguf.compare import diff_gguf

    src, kind = (vlm, kind) if kind != "q8_0-odd" else (tmp_path / "odd", "q8_0")
    if src != vlm:
        replica.build_vlm(src, seed=4, vision={**replica.VISION, "intermediate_size": 80, "out_hidden_size": 64})
    r = llamacpp.convert_mmproj(src, tmp_path / "theirs.gguf", kind, name="m")
    assert "error" not in r, r
    model = load_model(src, dtype=torch.float32 if kind == "f32" else torch.bfloat16, kernels=False)
    ours = export_mmproj(model, tmp_path / "ours.gguf", kind, name="m")
    a, b = open_gguf(ours), open_gguf(tmp_path / "theirs.gguf")
    assert diff_gguf(a, b) == []
    assert [n for n, t in a.tensors.items() if not np.array_equal(t.data, b.tensors[n].data)] == []
    if src != vlm:
        assert a.tensors["v.blk.0.ffn_down.weight"].tensor_type.name == "F16"


@pytest.mark.llamacpp
def test_llama_cpp_runs_our_gguf_and_mmproj(llamacpp, exported, tmp_path):
    """llama.cpp's libmtmd on our f32 text GGUF + mmproj against qwen35 on the same two files: the image
    becomes the same 15 tokens between the same text tokens, and embeddings, last log-probs and 12 greedy
    tokens agree (bounds: the module docstring)."""
    text, proj = exported["f32"]
    np.save(tmp_path / "rgb.npy", RGB)
    marker = "<__media__>"  # libmtmd's default marker, where it puts <|vision_start|>, the image, <|vision_end|>
    r = llamacpp.mtmd(text, proj, tmp_path / "rgb.npy", PROMPT.replace("<|vision_start|><|image_pad|><|vision_end|>",
                      marker), 12, tmp_path / "embd.npy", tmp_path / "logits.npy")
    assert "error" not in r, r
    model, tok = qwen35.load(text, dtype=torch.float32, kernels=False, mmproj=proj)
    ids = tok.encode(PROMPT)
    k = ids.index(12)
    assert r["chunks"] == [ids[:k], {"image_tokens": 15, "n_pos": 5}, ids[k + 1:]]
    x = image(model)
    with torch.no_grad():
        ours = model.visual(x.patches, [x.grid])
    theirs = torch.from_numpy(np.load(tmp_path / "embd.npy"))
    assert float((ours - theirs).abs().max()) < 1e-2, float((ours - theirs).abs().max())
    lp = image_logits(model, tok).double().log_softmax(-1)
    llp = torch.from_numpy(np.load(tmp_path / "logits.npy")).double().log_softmax(-1)
    assert float((lp - llp).abs().max()) < 2e-3, float((lp - llp).abs().max())
    greedy = [s.token for s in qwen35.stream_generate(model, tok, PROMPT, SamplingParams(temperature=0, max_tokens=12,
                                                                                          ignore_eos=True), images=[x])]
    assert greedy == r["greedy"]


def test_a_command_says_the_mmproj_it_found(exported, tmp_path):
    """A tower the user did not name is said on stderr by the commands (the library's info log is silent there)."""
    m = beside(exported["f32"][0], tmp_path / "fits", exported["f32"][1])
    p = subprocess.run([sys.executable, "-m", "qwen35", "generate", str(m), "--prompt", "Hi", "--max-tokens", "2",
                        "--temperature", "0", "--threads", "1", "--dtype", "float32"],
                       capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr
    assert (f"vision tower: {m.parent / 'mmproj-m.gguf'}, found beside the model (--no-mmproj: the text model "
            "alone)") in p.stderr
