"""GGUF edge cases: yarn settings travel both ways (or the export is refused), a failed export leaves the
previous file, corrupt tensor offsets and dims are named errors, a quantized checkpoint exports to another
type, the tokenizer defaults to the model's own and its absence is said before the weights load, and a GGUF is
recognised by its magic whatever its name."""

import errno
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen35 import CheckpointError
from qwen35.cli import main
from qwen35.commands.replica import build_replica
from qwen35.errors import Qwen35Error
from qwen35.gguf import export_gguf, open_gguf
from qwen35.quant import QuantizedWeight
from qwen35.weights import load_model

IDS = torch.tensor([[1, 5, 7, 100, 3, 9, 200, 44, 17, 301]])
SMALL = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1,
         "head_dim": 64, "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 32,
         "linear_value_head_dim": 32, "vocab_size": 512}
BUNDLED = Path(__file__).resolve().parent.parent / "qwen35" / "assets" / "model"
YARN = {"rope_type": "yarn", "rope_theta": 1e7, "partial_rotary_factor": 0.25, "mrope_section": [11, 11, 10],
        "mrope_interleaved": True, "factor": 4.0, "original_max_position_embeddings": 64}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf-src")
    build_replica(d, "tiny", layers=4, seed=3, tie_word_embeddings=False, **SMALL)
    return d


@pytest.fixture(scope="module")
def bf16_gguf(src, tmp_path_factory):
    p = tmp_path_factory.mktemp("gguf-bf16") / "m.gguf"
    export_gguf(load_model(src, dtype=torch.bfloat16, kernels=False), p, "bf16")
    return p


# --- yarn RoPE ---------------------------------------------------------------------------------------------

def test_yarn_beta_and_attention_factor_survive_export(tmp_path):
    """beta_fast / beta_slow / attention_factor go to llama.cpp's yarn_* keys and come back: the same logits
    at positions past the original context (where yarn's ramp matters)."""
    d = tmp_path / "src"
    build_replica(d, "tiny", layers=4, seed=3, rope_parameters={**YARN, "beta_fast": 8.0, "beta_slow": 2.0,
                                                                 "attention_factor": 1.5}, **SMALL)
    ref = load_model(d, dtype=torch.float32, kernels=False)
    export_gguf(ref, tmp_path / "m.gguf", "f32")
    f = open_gguf(tmp_path / "m.gguf")
    assert (f.get("qwen35.rope.scaling.yarn_beta_fast"), f.get("qwen35.rope.scaling.yarn_beta_slow"),
            f.get("qwen35.rope.scaling.yarn_attn_factor")) == (8.0, 2.0, 1.5)
    back = load_model(tmp_path / "m.gguf", dtype=torch.float32, kernels=False)
    c = back.config
    assert (c.rope_beta_fast, c.rope_beta_slow, c.rope_attention_factor) == (8.0, 2.0, 1.5)
    ids = torch.arange(300).reshape(1, -1) % 512
    assert torch.equal(ref(ids), back(ids))


@pytest.mark.parametrize("extra,words", [
    ({"truncate": False}, "cannot export yarn rope_parameters 'truncate': false to GGUF: GGUF has no key for it"),
    ({"mscale": 1.0, "mscale_all_dim": 0.5}, ("cannot export yarn rope_parameters 'mscale' (1.0) and "
                                              "'mscale_all_dim' (0.5) to GGUF: GGUF has no keys for them")),
])
def test_yarn_settings_gguf_cannot_hold_are_refused(tmp_path, extra, words):
    from gguf import GGUFWriter

    from qwen35.config import ModelConfig
    from qwen35.gguf.metadata import write_config

    d = tmp_path / "src"
    build_replica(d, "tiny", layers=4, seed=3, rope_parameters={**YARN, **extra}, **SMALL)
    with pytest.raises(CheckpointError, match=re.escape(words)):
        write_config(GGUFWriter(None, "qwen35"), ModelConfig.from_file(d), 1)
    # the command says so before loading any weights, and writes nothing
    assert main(["export", str(d), str(tmp_path / "m.gguf")]) == 1
    assert not (tmp_path / "m.gguf").exists()
    # mscale without an effect on the attention factor (attention_factor set) is no reason to refuse
    if "mscale" in extra:
        build_replica(tmp_path / "ok", "tiny", layers=4, seed=3,
                      rope_parameters={**YARN, **extra, "attention_factor": 1.25}, **SMALL)
        write_config(GGUFWriter(None, "qwen35"), ModelConfig.from_file(tmp_path / "ok"), 1)


# --- writing: a temporary file renamed over OUT ---------------------------------------------------------------

def _fail_mid_write(exc):
    """A GGUFWriter.write_tensors_to_file that writes part of the data, then raises `exc`."""
    def write(self, *, progress=False):
        self.write_ti_data_to_file()
        self.fout[0].write(b"\0" * 4096)
        raise exc
    return write


def test_failed_export_leaves_the_previous_file(src, bf16_gguf, tmp_path, monkeypatch):
    import gguf

    out = tmp_path / "m.gguf"
    shutil.copy(bf16_gguf, out)
    before = out.read_bytes()
    model = load_model(src, dtype=torch.bfloat16, kernels=False)
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file",
                        _fail_mid_write(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(Qwen35Error, match=re.escape(f"{out}: could not write the GGUF file (No space left on "
                                                    f"device); no file was changed")):
        export_gguf(model, out, "q8_0")
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]

    # Ctrl-C: the interrupt goes on, the temporary goes away
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", _fail_mid_write(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        export_gguf(model, out, "bf16")
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]

    # every part of a split is a temporary until all are written
    too_large = _fail_mid_write(OSError(errno.EFBIG, "File too large"))
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", too_large)
    with pytest.raises(Qwen35Error, match=re.escape("(File too large); no file was changed")):
        export_gguf(model, tmp_path / "s.gguf", "bf16", split_max_bytes=200_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]

    # re-exported onto itself by the command: a named error (exit 1), and the source still loads as before
    ref = load_model(out, dtype=torch.bfloat16, kernels=False)
    assert main(["export", str(out), str(out), "--type", "q8_0"]) == 1
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    assert torch.equal(load_model(out, dtype=torch.bfloat16, kernels=False)(IDS), ref(IDS))


def test_export_onto_itself_replaces_the_file(bf16_gguf, tmp_path):
    out = tmp_path / "m.gguf"
    shutil.copy(bf16_gguf, out)
    assert main(["export", str(out), str(out), "--type", "q8_0"]) == 0
    assert open_gguf(out).tensors["blk.0.attn_qkv.weight"].tensor_type.name == "Q8_0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


# --- reading: offsets and dims -------------------------------------------------------------------------------

def _patched(p: Path, out: Path, at: int, value: int) -> Path:
    raw = bytearray(p.read_bytes())
    raw[at : at + 8] = value.to_bytes(8, "little")
    out.write_bytes(bytes(raw))
    return out


def test_misaligned_and_overlapping_offsets_are_refused(bf16_gguf, tmp_path, capsys):
    f = open_gguf(bf16_gguf)
    t = f.tensors

    def rel(name):  # the offset as stored: u64 after the u32 type id, relative to the data section
        return int.from_bytes(bf16_gguf.read_bytes()[t[name].type_offset + 4 : t[name].type_offset + 12], "little")

    name = "blk.0.attn_norm.weight"
    bad = _patched(bf16_gguf, tmp_path / "odd.gguf", t[name].type_offset + 4, rel(name) + 2)
    with pytest.raises(CheckpointError, match=re.escape(f"{bad}: tensor '{name}' has data offset {rel(name) + 2}, "
                                                        f"not a multiple of general.alignment (32)")):
        load_model(bad)
    # an offset into another tensor's bytes (same shape and type: nothing else would notice)
    up, gate = "blk.0.ffn_up.weight", "blk.0.ffn_gate.weight"
    alias = _patched(bf16_gguf, tmp_path / "alias.gguf", t[up].type_offset + 4, rel(gate))
    with pytest.raises(CheckpointError, match=re.escape(f"{alias}: tensor '{up}' (data at byte {t[gate].offset}) "
                                                        f"overlaps tensor '{gate}'")):
        load_model(alias)
    assert main(["verify", str(alias)]) == 1
    assert f"tensor '{up}' (data at byte {t[gate].offset}) overlaps tensor '{gate}'" in capsys.readouterr().out


@pytest.mark.parametrize("ne1", [2**56, 2**40])  # 2**56 wrapped np.prod to 0 bytes; 2**40 is just too big
def test_absurd_dims_are_named(bf16_gguf, tmp_path, capsys, ne1):
    t = open_gguf(bf16_gguf).tensors["token_embd.weight"]
    bad = _patched(bf16_gguf, tmp_path / "dims.gguf", t.type_offset - 8, ne1)  # dims [ne0, ne1] end at the type
    words = (f"{bad}: tensor 'token_embd.weight' has dims [128, {ne1}] (BF16, {128 * ne1 * 2} bytes), more "
             f"than the whole file ({bad.stat().st_size} bytes)")
    for call in (open_gguf, load_model):
        with pytest.raises(CheckpointError, match=re.escape(words)):
            call(bad)
    for cmd in ("info", "verify"):
        assert main([cmd, str(bad)]) == 1
        out = capsys.readouterr()
        assert words in out.out + out.err and "Traceback" not in out.err


def test_tensor_repeated_in_one_file_is_named(bf16_gguf, tmp_path):
    raw = bf16_gguf.read_bytes()
    assert raw.count(b"blk.1.attn_qkv.weight") == 1
    dup = tmp_path / "dup.gguf"
    dup.write_bytes(raw.replace(b"blk.1.attn_qkv.weight", b"blk.0.attn_qkv.weight"))
    with pytest.raises(CheckpointError, match=re.escape(f"{dup}: tensor 'blk.0.attn_qkv.weight' appears twice in "
                                                        f"the file")):
        open_gguf(dup)


# --- export sources: a quantized checkpoint, the model's own tokenizer ----------------------------------------

def test_quantized_checkpoint_exports_to_another_type(src, tmp_path, caplog):
    """A `qwen35 quantize --quant int4` checkpoint exported as q8_0: its Q8_0 matrices keep their bytes, the
    others are requantized from their dequantized values (a warning counts them)."""
    from qwen35.quant.formats import quantize_fast

    d, q = tmp_path / "src", tmp_path / "int4"
    shutil.copytree(src, d)
    shutil.copy(BUNDLED / "tokenizer.json", d)  # the command puts the checkpoint's tokenizer in; quantize copies it
    assert main(["quantize", str(d), str(q), "--quant", "int4"]) == 0
    with caplog.at_level("WARNING", logger="qwen35"):
        assert main(["export", str(q), str(tmp_path / "m.gguf"), "--type", "q8_0"]) == 0
    ref = load_model(q, dtype=torch.bfloat16, kernels=False)
    back = load_model(tmp_path / "m.gguf", dtype=torch.bfloat16, kernels=False)
    wb = dict(back.named_weights())
    requantized = 0
    for n, w in ref.named_weights():
        if not isinstance(w, QuantizedWeight):
            continue
        qs, d = (w.qs, w.d) if w.scheme == "q8_0" else quantize_fast("q8_0", w.dequantize(torch.float32))
        requantized += w.scheme != "q8_0"
        assert wb[n].scheme == "q8_0" and torch.equal(wb[n].qs, qs) and torch.equal(wb[n].d, d), n
    assert requantized and f"{requantized} quantized matrices of the model were in another layout" in caplog.text


def test_export_defaults_to_the_models_own_tokenizer(tmp_path):
    import qwen35
    from qwen35.gguf.compare import diff_gguf
    from qwen35.tokenizer import Tokenizer

    model, tok = qwen35.load(BUNDLED, kernels=False)
    export_gguf(model, tmp_path / "a.gguf", "bf16")  # no tokenizer_from: the directory it was loaded from
    text = "Hello, world! naïve café 🙂"
    assert Tokenizer(tmp_path / "a.gguf").encode(text) == tok.encode(text)
    export_gguf(load_model(tmp_path / "a.gguf", kernels=False), tmp_path / "b.gguf", "bf16")  # from a GGUF
    a, b = open_gguf(tmp_path / "a.gguf"), open_gguf(tmp_path / "b.gguf")
    assert [k for k in diff_gguf(a, b) if "tokenizer." in str(k)] == []
    assert b.get("tokenizer.ggml.tokens") == a.get("tokenizer.ggml.tokens")


def test_gguf_without_tokenizer_is_said_before_the_weights_load(src, tmp_path, monkeypatch, caplog):
    import qwen35
    import qwen35.api

    with caplog.at_level("WARNING", logger="qwen35"):  # the replica has no tokenizer.json
        export_gguf(load_model(src, dtype=torch.bfloat16, kernels=False), tmp_path / "m.gguf", "bf16")
    assert "without a tokenizer" in caplog.text

    def no_weights(*a, **k):
        raise AssertionError("the weights were loaded before the tokenizer was checked")

    monkeypatch.setattr(qwen35.api, "load_model", no_weights)
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'm.gguf'}: the GGUF holds no tokenizer "
                                                        f"metadata (no tokenizer.ggml.model)")):
        qwen35.load(tmp_path / "m.gguf")


# --- recognising a GGUF --------------------------------------------------------------------------------------

def test_is_gguf_file_by_name_in_any_case_or_by_magic(bf16_gguf, tmp_path):
    from qwen35.gguf.reader import is_gguf_file, split_parts

    shutil.copy(bf16_gguf, tmp_path / "UPPER.GGUF")
    shutil.copy(bf16_gguf, tmp_path / "noext")
    (tmp_path / "text.gguf").write_text("not a model")
    (tmp_path / "text").write_text("not a model")
    (tmp_path / "dir.gguf").mkdir()
    assert is_gguf_file(tmp_path / "UPPER.GGUF") and is_gguf_file(tmp_path / "noext")
    assert is_gguf_file(tmp_path / "text.gguf")  # by name: open_gguf then says it is not GGUF
    assert not is_gguf_file(tmp_path / "text") and not is_gguf_file(tmp_path / "dir.gguf")
    assert not is_gguf_file(tmp_path / "missing.gguf")
    # the public test says what load_model does (it had been by lower-case name only)
    from qwen35.gguf import is_gguf
    assert is_gguf(tmp_path / "UPPER.GGUF") and is_gguf(tmp_path / "noext") and not is_gguf(tmp_path / "dir.gguf")
    assert np.array_equal(open_gguf(tmp_path / "noext").tensors["output.weight"].data,
                          open_gguf(bf16_gguf).tensors["output.weight"].data)
    # an uppercase split keeps its parts' own extension
    for k in (1, 2):
        (tmp_path / f"s-0000{k}-of-00002.GGUF").write_bytes(b"")
    assert [p.name for p in split_parts(tmp_path / "s-00002-of-00002.GGUF")] == ["s-00001-of-00002.GGUF",
                                                                                 "s-00002-of-00002.GGUF"]


def test_a_gguf_of_any_name_loads_and_is_read_by_info_and_verify(bf16_gguf, tmp_path, capsys):
    """load_model, info and verify tell a GGUF by its magic, not its extension: UPPER.GGUF and a file with
    no extension load to the same logits as m.gguf (they used to be taken for checkpoint folders: 'is not a
    directory')."""
    want = load_model(bf16_gguf, dtype=torch.float32, kernels=False)(IDS)
    for name in ("UPPER.GGUF", "noext"):
        p = tmp_path / name
        shutil.copy(bf16_gguf, p)
        assert torch.equal(load_model(p, dtype=torch.float32, kernels=False)(IDS), want)
        assert main(["verify", str(p)]) == 0
        assert main(["info", str(p)]) == 0
    capsys.readouterr()
