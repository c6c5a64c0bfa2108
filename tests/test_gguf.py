"""GGUF in and out: export -> import gives back the same model (bit for bit in bf16, the same packed bytes in
q8_0 / q4_0), llama.cpp's names and layouts are undone exactly, the tokenizer travels in the metadata, split
files load, and broken files are named errors."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFValueType

from qwen35 import CheckpointError
from qwen35.commands.replica import build_replica
from qwen35.gguf import export_gguf, names, open_gguf
from qwen35.gguf.reader import to_torch
from qwen35.quant import QuantizedWeight
from qwen35.weights import load_model

IDS = torch.tensor([[1, 5, 7, 100, 3, 9, 200, 44, 17, 301]])
# Hv = 2 Hk (llama.cpp reorders value heads), head dims multiples of 32 (its column reorder moves whole blocks)
SMALL = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
             linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32,
             vocab_size=512)
BUNDLED = Path(__file__).resolve().parent.parent / "qwen35" / "assets" / "model"


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf-src")
    build_replica(d, "tiny", layers=4, seed=3, tie_word_embeddings=False, **SMALL)
    return d


def weights_equal(a, b) -> list[str]:
    """Names whose weights differ (quantized ones: by their packed bytes and scales; norms by 1 + w, A_log by exp)."""
    wa, wb = dict(a.named_weights()), dict(b.named_weights())
    assert wa.keys() == wb.keys()
    bad = []
    for n, x in wa.items():
        y = wb[n]
        if isinstance(x, QuantizedWeight):
            same = isinstance(y, QuantizedWeight) and x.scheme == y.scheme and torch.equal(x.qs, y.qs) \
                and torch.equal(x.d, y.d)
        elif names.is_centred_norm(n):  # used as 1 + w, which is what llama.cpp stores: w itself may differ
            same = x.dtype == y.dtype and torch.equal(1.0 + x.float(), 1.0 + y.float())
        elif n.endswith("A_log"):  # likewise used (and stored by llama.cpp) as exp(A_log)
            same = x.dtype == y.dtype and torch.equal(x.float().exp(), y.float().exp())
        else:
            same = not isinstance(y, QuantizedWeight) and x.dtype == y.dtype and torch.equal(x, y)
        if not same:
            bad.append(n)
    return bad


def test_bf16_round_trip_is_exact(src, tmp_path):
    ref = load_model(src, dtype=torch.bfloat16, kernels=False)
    export_gguf(ref, tmp_path / "m.gguf", "bf16")
    back = load_model(tmp_path / "m.gguf", dtype=torch.bfloat16, kernels=False)
    assert weights_equal(ref, back) == []
    assert torch.equal(ref(IDS), back(IDS))
    assert back.mtp is not None and back.config.layer_types == ref.config.layer_types
    f = open_gguf(tmp_path / "m.gguf")
    kinds = {n: t.tensor_type.name for n, t in f.tensors.items()}
    assert kinds["blk.0.ssm_a"] == kinds["blk.0.ssm_conv1d.weight"] == kinds["blk.3.attn_q_norm.weight"] == "F32"
    assert kinds["blk.0.attn_qkv.weight"] == kinds["output.weight"] == "BF16"
    assert "blk.4.nextn.eh_proj.weight" in kinds


@pytest.mark.parametrize("file_type", ["q8_0", "q4_0", "q4_k_m"])
def test_quantized_round_trip_keeps_the_bytes(src, tmp_path, file_type):
    """q4_k_m is our int4 policy: Q4_K (256-blocks) and Q8_0 tensors, Q4_0 and Q8_0 in place of Q4_K and Q6_K where K is not a
    multiple of 256 (this replica's hidden size of 128)."""
    scheme = {"q4_k_m": "int4"}.get(file_type, file_type)
    ref = load_model(src, dtype=torch.bfloat16, kernels=False, quant=scheme)
    export_gguf(ref, tmp_path / "m.gguf", file_type)
    back = load_model(tmp_path / "m.gguf", dtype=torch.bfloat16, kernels=False)
    assert back.quant == (scheme if scheme != "int4" else "gguf")
    assert weights_equal(ref, back) == []
    assert torch.equal(ref(IDS), back(IDS))
    kinds = {t.tensor_type.name for t in open_gguf(tmp_path / "m.gguf").tensors.values()}
    if file_type == "q4_k_m":
        assert kinds == {"F32", "BF16", "Q4_K", "Q8_0", "Q4_0"}
        return
    # a float model exported to the type writes the same bytes as one loaded with quant=
    plain = load_model(src, dtype=torch.bfloat16, kernels=False)
    export_gguf(plain, tmp_path / "p.gguf", scheme)
    a, b = open_gguf(tmp_path / "m.gguf"), open_gguf(tmp_path / "p.gguf")
    assert a.tensors.keys() == b.tensors.keys()
    for n, t in a.tensors.items():
        assert t.tensor_type == b.tensors[n].tensor_type and np.array_equal(t.data, b.tensors[n].data), n
    assert a.tensors["blk.0.attn_qkv.weight"].tensor_type.name == scheme.upper()
    assert a.tensors["token_embd.weight"].tensor_type.name == "BF16"  # untied embedding: kept, like quant=


def test_float_gguf_quantized_at_load_equals_quant_load(src, tmp_path):
    export_gguf(load_model(src, dtype=torch.bfloat16, kernels=False), tmp_path / "m.gguf", "bf16")
    a = load_model(src, dtype=torch.bfloat16, kernels=False, quant="int4")
    b = load_model(tmp_path / "m.gguf", dtype=torch.bfloat16, kernels=False, quant="int4")
    assert weights_equal(a, b) == []
    q = tmp_path / "q.gguf"
    export_gguf(a, q, "q8_0")
    with pytest.raises(CheckpointError, match="already quantized"):
        load_model(q, quant="q4_0")
    assert weights_equal(load_model(q, quant="q8_0", kernels=False), load_model(q, kernels=False)) == []


def test_unaligned_value_heads_are_requantized(tmp_path, caplog):
    """Value heads of 24 dims: out_proj's column reorder splits blocks, so that matrix is requantized in
    llama.cpp's order on export and, on import, dequantized in that order and requantized in ours (q8_0, a
    warning says so); everything else keeps its bytes."""
    from qwen35.quant import formats

    d = tmp_path / "src"
    build_replica(d, "tiny", layers=4, seed=5, **{**SMALL, "linear_value_head_dim": 24, "linear_num_value_heads": 4,
                                                   "tie_word_embeddings": True})
    ref = load_model(d, dtype=torch.bfloat16, kernels=False, quant="q8_0")
    export_gguf(ref, tmp_path / "m.gguf", "q8_0")
    with caplog.at_level("WARNING", logger="qwen35"):
        back = load_model(tmp_path / "m.gguf", dtype=torch.bfloat16, kernels=False)
    assert "3 Q8_0 tensors converted to q8_0" in caplog.text
    outs = [f"model.layers.{i}.linear_attn.out_proj.weight" for i in (0, 1, 2)]
    assert weights_equal(ref, back) == outs
    f = open_gguf(tmp_path / "m.gguf")
    for i, n in enumerate(outs):
        w = back.model.layers[i].linear_attn.out_proj.weight
        theirs = names.from_gguf(n, to_torch(f.tensors[f"blk.{i}.ssm_out.weight"]), back.config, tuple(w.shape))
        qs, dd = formats.quantize_q8_0(theirs)
        assert w.scheme == "q8_0" and torch.equal(w.qs, qs) and torch.equal(w.d, dd)
    torch.testing.assert_close(back(IDS).float(), ref(IDS).float(), atol=0.05, rtol=0)


def test_mtp_can_be_dropped(src, tmp_path):
    export_gguf(load_model(src, dtype=torch.bfloat16, kernels=False), tmp_path / "m.gguf", "bf16", mtp=False)
    f = open_gguf(tmp_path / "m.gguf")
    assert f.get("qwen35.block_count") == 4 and f.get("qwen35.nextn_predict_layers") is None
    assert not any("nextn" in n or n.startswith("blk.4.") for n in f.tensors)
    assert load_model(tmp_path / "m.gguf", kernels=False).mtp is None


def test_split_files_load_and_a_missing_part_is_named(src, tmp_path):
    ref = load_model(src, dtype=torch.bfloat16, kernels=False)
    files = export_gguf(ref, tmp_path / "m.gguf", "bf16", split_max_bytes=200_000)
    assert len(files) > 2 and files[0].name == f"m-00001-of-{len(files):05d}.gguf"
    back = load_model(files[1], dtype=torch.bfloat16, kernels=False)  # any part names the model
    assert torch.equal(ref(IDS), back(IDS))
    files[-1].unlink()
    with pytest.raises(CheckpointError, match=f"part {files[-1].name} is missing"):
        load_model(files[0])


def test_name_table_and_transforms_invert_exactly(src):
    model = load_model(src, kernels=False)
    L = model.config.num_hidden_layers
    gen = torch.Generator().manual_seed(0)
    for n, p in model.named_parameters():
        g = names.gguf_name(n, L)
        assert names.our_name(g, L) == n
        t = torch.randn(p.shape, generator=gen) * 0.5
        back = names.from_gguf(n, names.to_gguf(n, t, model.config), model.config, tuple(p.shape))
        if n.endswith("A_log"):  # what the model computes from them is exact
            assert torch.equal(back.exp(), t.exp()), n
        elif names.is_centred_norm(n):
            assert torch.equal(1.0 + back, 1.0 + t), n
        else:
            assert torch.equal(back, t), n
    assert names.our_name("blk.0.ffn_up.weight.extra", L) is None


def test_value_heads_go_to_llama_cpp_tiled_order(src):
    """Grouped [k0: v0 v1, k1: v0 v1] -> tiled [v0: k0 k1, v1: k0 k1], on rows and on out_proj's columns."""
    c = load_model(src, kernels=False).config  # Hk 2, Hv 4, Dv 32
    z = torch.arange(4).repeat_interleave(32)[:, None].float()  # row r holds its grouped head index
    tiled = names.to_gguf("model.layers.0.linear_attn.in_proj_z.weight", z, c)[::32, 0].tolist()
    assert tiled == [0, 2, 1, 3]
    out = names.to_gguf("model.layers.0.linear_attn.out_proj.weight", z.t(), c)[0, ::32].tolist()
    assert out == [0, 2, 1, 3]


def test_tokenizer_and_template_come_from_the_gguf(tmp_path):
    import shutil

    import qwen35
    from qwen35.tokenizer import Tokenizer

    d = tmp_path / "model"
    shutil.copytree(BUNDLED, d)
    (d / "chat_template.jinja").write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                                           "<|im_end|>\n{% endfor %}")
    model, tok = qwen35.load(d, kernels=False)
    export_gguf(model, tmp_path / "m.gguf", "bf16", tokenizer_from=d)
    model2, tok2 = qwen35.load(tmp_path / "m.gguf", kernels=False)
    texts = ["Hello, world!", "  indented\n\tcode = 42;  ", "<|im_start|>user\nHi<|im_end|>\n<think>\n",
             "naïve café — 東京 🙂", "It's 1234567 o'clock"]
    for s in texts:
        assert tok2.encode(s) == tok.encode(s), s
        assert tok2.decode(tok.encode(s)) == s
    assert tok2.eos_token_ids == tok.eos_token_ids
    assert tok2.vocab_size == tok.vocab_size
    assert b"".join(tok2.token_bytes(i) for i in tok.encode(texts[3])) == texts[3].encode()
    msgs = [{"role": "user", "content": "hi"}]
    assert tok2.chat_template.render(msgs) == tok.chat_template.render(msgs)
    assert Tokenizer(tmp_path / "m.gguf").encode(texts[0]) == tok.encode(texts[0])
    assert torch.equal(model(IDS), model2(IDS))


def _damaged(src, tmp_path, name="m.gguf") -> Path:
    p = tmp_path / name
    export_gguf(load_model(src, dtype=torch.bfloat16, kernels=False), p, "bf16")
    return p


def test_bad_files_are_named_errors(src, tmp_path):
    from gguf import GGUFWriter

    p = _damaged(src, tmp_path)
    data = p.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 5000])
    with pytest.raises(CheckpointError, match=r"cut.gguf: file is truncated: tensor '[^']+' ends at byte"):
        load_model(tmp_path / "cut.gguf")
    (tmp_path / "head.gguf").write_bytes(data[:300])
    with pytest.raises(CheckpointError, match="head.gguf: file is truncated inside its header"):
        load_model(tmp_path / "head.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"PK\x03\x04" + data[4:100])
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_model(tmp_path / "junk.gguf")

    # an unknown tensor type id, patched into the first tensor's info
    f = open_gguf(p)
    first = next(iter(f.tensors.values()))
    at = first.type_offset
    raw = bytearray(data)
    raw[at : at + 4] = (250).to_bytes(4, "little")
    (tmp_path / "type.gguf").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=rf"tensor '{first.name}' has GGML type id 250"):
        load_model(tmp_path / "type.gguf")

    w = GGUFWriter(tmp_path / "llama.gguf", "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"GGUF architecture is 'llama' \(Llama\); qwen35 runs only 'qwen35'"):
        load_model(tmp_path / "llama.gguf")


def test_export_command_and_gguf_to_gguf_reexport(tmp_path):
    """`qwen35 export` from the checkpoint and from its own bf16 GGUF (tokenizer metadata copied) give the
    same q8_0 file, key for key and byte for byte."""
    from qwen35.cli import main
    from qwen35.gguf.compare import diff_gguf

    assert main(["export", str(BUNDLED), str(tmp_path / "a.gguf"), "--type", "q8_0", "--name", "m"]) == 0
    assert main(["export", str(BUNDLED), str(tmp_path / "b16.gguf"), "--name", "m"]) == 0
    assert main(["export", str(tmp_path / "b16.gguf"), str(tmp_path / "b.gguf"), "--type", "q8_0", "--name", "m"]) == 0
    a, b = open_gguf(tmp_path / "a.gguf"), open_gguf(tmp_path / "b.gguf")
    assert diff_gguf(a, b) == []
    assert all(np.array_equal(t.data, b.tensors[n].data) for n, t in a.tensors.items())
    assert main(["export", str(BUNDLED), str(tmp_path / "x.bin")]) == 1  # a named error, not a traceback


def test_writer_plan_for_0_8b_equals_llama_cpp_files():
    """For the Qwen3.5-0.8B config (no weights built), our tensor names, GGUF shapes and types for bf16 and
    q8_0, and our hyperparameter keys, equal those of llama.cpp's converter and quantizer files
    (tests/llamacpp_0.8b_manifest.json, written from them by benchmarks/check_gguf_vs_llamacpp.py). Ours
    adds qwen35.attention.recurrent_layers, which llama.cpp writes when config.json lists layer_types."""
    import json

    from gguf import GGUFWriter

    from qwen35.config import ModelConfig
    from qwen35.gguf.loader import _gguf_shape
    from qwen35.gguf.metadata import write_config
    from qwen35.gguf.writer import tensor_plan
    from qwen35.model.qwen35 import Qwen35ForCausalLM
    from qwen35.shapes import composite_config

    want = json.loads((Path(__file__).parent / "llamacpp_0.8b_manifest.json").read_text())
    config = ModelConfig.from_hf(composite_config("0.8b"))
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in Qwen35ForCausalLM(config, mtp_layers=1).named_parameters()}
    for kind in ("bf16", "q8_0"):
        ours = {g: [t, list(reversed(_gguf_shape(n, shapes[n])))] for n, g, t in tensor_plan(config, shapes, kind)}
        assert ours == want[kind], kind
    w = GGUFWriter(None, "qwen35")
    write_config(w, config, 1)
    meta = {k: v.value for k, v in w.kv_data[0].items() if k.startswith("qwen35.")}
    assert meta.pop("qwen35.attention.recurrent_layers") == [(i + 1) % 4 != 0 for i in range(24)] + [False]
    assert meta.keys() == want["metadata"].keys()
    for k, v in want["metadata"].items():
        assert meta[k] == pytest.approx(v, rel=1e-7), k


def _metadata_gguf(src, path: Path, edits: dict | None = None) -> Path:
    """A GGUF with only what the config is read from: `src`'s hyperparameter keys as export writes them
    (write_config) and a token_embd tensor, `edits` ({key: (value, GGUFValueType)}) written over the keys."""
    from gguf import GGUFValue, GGUFWriter

    from qwen35.config import ModelConfig
    from qwen35.gguf.metadata import write_config

    config = ModelConfig.from_file(src)
    w = GGUFWriter(path, "qwen35")
    write_config(w, config, 1)
    for key, (value, kind) in (edits or {}).items():
        w.kv_data[0][key] = GGUFValue(value, kind)
    w.add_tensor("token_embd.weight", np.zeros((config.vocab_size, config.hidden_size), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


U32, F32, STR = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.STRING


@pytest.mark.parametrize("key,value,words", [
    ("qwen35.block_count", ("eight", STR), "'qwen35.block_count' must be an integer >= 1, got 'eight'"),
    ("qwen35.block_count", (0, U32), "'qwen35.block_count' must be an integer >= 1, got 0"),
    ("qwen35.embedding_length", (128.5, F32), "'qwen35.embedding_length' must be an integer >= 1, got 128.5"),
    ("qwen35.ssm.time_step_rank", (0, U32), "'qwen35.ssm.time_step_rank' must be an integer >= 1, got 0"),
    ("qwen35.attention.key_length", (0, U32), "'qwen35.attention.key_length' must be an integer >= 1, got 0"),
    ("qwen35.context_length", (0, U32), "'qwen35.context_length' must be an integer >= 1, got 0"),
    ("qwen35.rope.dimension_sections", ("abc", STR),
     "'qwen35.rope.dimension_sections' must be an array of integers >= 0, got 'abc'"),
    ("qwen35.rope.freq_base", ("x", STR), "'qwen35.rope.freq_base' must be a positive number, got 'x'"),
    ("qwen35.attention.layer_norm_rms_epsilon", (-1.0, F32),
     "'qwen35.attention.layer_norm_rms_epsilon' must be a positive number, got -1.0"),
    ("qwen35.nextn_predict_layers", (5, U32), "'qwen35.nextn_predict_layers' (5) leaves no text layers of "
                                              "'qwen35.block_count' (5)"),
    ("qwen35.ssm.inner_size", (130, U32), "'qwen35.ssm.inner_size' (130) is not a multiple of "
                                          "'qwen35.ssm.time_step_rank' (4)"),
    ("qwen35.attention.recurrent_layers", (True, GGUFValueType.BOOL),
     "'qwen35.attention.recurrent_layers' must be an array of 4 or more flags, got True"),
    ("tokenizer.ggml.eos_token_id", ("x", STR), "'tokenizer.ggml.eos_token_id' must be an integer, got 'x'"),
    ("general.alignment", (0, U32), "'general.alignment' must be a power of two, got 0"),
    ("general.alignment", (7, U32), "'general.alignment' must be a power of two, got 7"),  # llama.cpp refuses it
])
def test_bad_metadata_values_are_named(src, tmp_path, key, value, words):
    """A hyperparameter of the wrong type, or a zero that something divides by, is a CheckpointError naming
    the file and the key (not a ValueError / ZeroDivisionError, nor tensor data read at the wrong offset)."""
    p = _metadata_gguf(src, tmp_path / "m.gguf", {key: value})
    with pytest.raises(CheckpointError, match=re.escape(f"{p}: metadata key {words}")):
        load_model(p)


def test_metadata_gguf_reads_back_and_eos_outside_the_vocabulary_is_dropped(src, tmp_path, caplog):
    """The edit-free file reads back to src's shape (so the failures above are the edits'); an eos id the
    model cannot emit is dropped with a warning naming the key, as for config.json (and as llama.cpp does)."""
    from qwen35.gguf.loader import read_config

    c = read_config(_metadata_gguf(src, tmp_path / "ok.gguf", {"tokenizer.ggml.eos_token_id": (7, U32)}))
    assert (c.num_hidden_layers, c.mtp_num_hidden_layers, c.linear_value_head_dim) == (4, 1, 32)
    assert c.eos_token_ids == (7,)
    with caplog.at_level("WARNING", logger="qwen35"):
        c = read_config(_metadata_gguf(src, tmp_path / "m.gguf", {"tokenizer.ggml.eos_token_id": (99999, U32)}))
    assert c.eos_token_ids == ()
    assert "m.gguf: metadata key 'tokenizer.ggml.eos_token_id' = 99999 is not a token id of the 512-token" \
        in caplog.text


def test_a_vision_tower_goes_to_its_own_file(vision_replica, tmp_path, caplog):
    """GGUF holds the text model: export_gguf of a vision checkpoint writes no tower tensors, and says where the
    tower goes (llama.cpp's mmproj file, tests/test_gguf_mmproj.py); no warning, since nothing is lost."""
    model = load_model(vision_replica[1], dtype=torch.bfloat16, kernels=False)
    with caplog.at_level("INFO", logger="qwen35"):
        export_gguf(model, tmp_path / "v.gguf", "bf16")
    assert "the vision tower goes to its own mmproj file" in caplog.text
    assert not [r for r in caplog.records if r.levelname == "WARNING" and "tower" in str(r.msg)]
    assert not [n for n in open_gguf(tmp_path / "v.gguf").tensors if n.startswith(("v.", "mm."))]
    assert load_model(tmp_path / "v.gguf", kernels=False).visual is None
