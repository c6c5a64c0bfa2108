"""The vision tower as llama.cpp's mmproj GGUF: our file is the converter's (`convert_hf_to_gguf.py --mmproj`)
key for key and byte for byte, export -> load gives back the checkpoint's image-prompt logits exactly, `qwen35
export` writes it beside the text GGUF, a wrong or mismatched file is a named error, and llama.cpp's libmtmd
runs our text GGUF + mmproj to qwen35's numbers.

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
    assert main(["export", str(text), str(tmp_path / "c.gguf")]) == 0
    assert "is a GGUF, which holds no vision tower: no mmproj written" in capsys.readouterr().out
    assert main(["export", str(text), str(tmp_path / "d.gguf"), "--mmproj", str(tmp_path / "d-mm.gguf")]) == 1
    assert "is a GGUF, which holds the text model only: there is no vision tower to write" in capsys.readouterr().err
    assert not (tmp_path / "d.gguf").exists()  # refused before anything was written
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
    from gguf import GGUFWriter

    f = open_gguf(proj)
    w = GGUFWriter(tmp_path / "short.gguf", "clip")
    for k in ("general.type", "clip.has_vision_encoder", "clip.projector_type"):
        w.add_string(k, f.get(k)) if isinstance(f.get(k), str) else w.add_bool(k, f.get(k))
    for k in ("projection_dim", "patch_size", "embedding_length", "feed_forward_length", "block_count",
              "attention.head_count", "spatial_merge_size"):
        w.add_uint32(f"clip.vision.{k}", f.get(f"clip.vision.{k}"))
    w.add_array("clip.vision.image_mean", f.get("clip.vision.image_mean"))
    w.add_array("clip.vision.image_std", f.get("clip.vision.image_std"))
    for n, t in f.tensors.items():
        if n != "mm.2.bias":
            w.add_tensor(n, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"short.gguf: missing tensor 'mm.2.bias' for a tower of 2 blocks"):
        load_model(text, mmproj=tmp_path / "short.gguf")
    with pytest.raises(CheckpointError, match=rf"{proj}: the model already has a vision tower"):
        load_model(vlm, mmproj=proj)


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
