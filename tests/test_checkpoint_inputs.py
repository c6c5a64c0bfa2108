"""Damaged checkpoint records, each refused by `qwen35 verify` and `load_model` alike with one message naming the
file and what is wrong in it (never a TypeError, never a pass): safetensors header entries, safetensors index
weight maps, manifests; and a KV cache format the model's heads cannot take, refused at load."""

import json
import shutil
import struct
from pathlib import Path

import pytest

import qwen35
from qwen35 import CheckpointError
from qwen35.cli import main
from qwen35.commands.replica import build_replica
from qwen35.manifest import MANIFEST, read_manifest
from qwen35.quant.formats import QuantError

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1,
         "head_dim": 32, "linear_num_key_heads": 1, "linear_num_value_heads": 2, "linear_key_head_dim": 32,
         "linear_value_head_dim": 32, "vocab_size": 256}
INDEX = "model.safetensors.index.json"
EMBED = "model.language_model.embed_tokens.weight"  # BF16 [256, 64], first in the first shard


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs") / "ckpt"
    build_replica(d, "tiny", layers=4, seed=1, shard_bytes=120_000, **SMALL)
    return d


@pytest.fixture
def ckpt(sharded, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(sharded, d)
    return d


def verify(capsys, *argv) -> tuple[int, list[str]]:
    rc = main(["verify", *map(str, argv)])
    return rc, capsys.readouterr().out.strip().splitlines()


def first_shard(d: Path) -> Path:
    return min(d.glob("*.safetensors"))


def edit_header(f: Path, edit) -> None:
    """Rewrite a safetensors header through edit(header dict), the tensor data as it was (offsets are
    relative to the data, so the header may change length)."""
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def set_field(key, value):
    return lambda h: h[EMBED].__setitem__(key, value)


def named_by_verify_and_load(capsys, ckpt, want: str) -> None:
    """`qwen35 verify` reports `want` as its first problem (kind "corrupt"), and load_model raises it."""
    rc, out = verify(capsys, ckpt)
    assert rc == 1 and out[0].startswith(f"corrupt: {want}"), out
    with pytest.raises(CheckpointError) as e:
        qwen35.load_model(ckpt, kernels=False)
    assert str(e.value).startswith(want)


@pytest.mark.parametrize("edit,problem", [
    (set_field("shape", ["a", "b"]), 'shape ["a", "b"] is not a list of non-negative integers'),
    (set_field("shape", 5), "shape 5 is not a list of non-negative integers"),
    (set_field("shape", [256.0, 64.0]), "shape [256.0, 64.0] is not a list of non-negative integers"),
    (set_field("shape", [-256, -64]), "shape [-256, -64] is not a list of non-negative integers"),
    (set_field("shape", [True, 64]), "shape [true, 64] is not a list of non-negative integers"),
    (set_field("dtype", ["BF16"]), 'dtype ["BF16"] is not a string'),
    (set_field("data_offsets", ["0", "32768"]), ('data_offsets ["0", "32768"] are not two integers [begin, end] '
                                                 "with 0 <= begin <= end")),
    (set_field("data_offsets", [0, 8, 9]), "data_offsets [0, 8, 9] are not two integers"),
    (set_field("data_offsets", [100, 0]), "data_offsets [100, 0] are not two integers"),
    (set_field("data_offsets", [0, 100]), "100 bytes stored for shape [256, 64] BF16 (32768 bytes expected)"),
    (lambda h: h[EMBED].pop("shape"), "no 'shape'"),
    (lambda h: h.__setitem__(EMBED, [1, 2]), "expected an object with dtype, shape and data_offsets, got [1, 2]"),
])
def test_a_malformed_header_entry_is_named_by_verify_and_load(ckpt, capsys, edit, problem):
    f = first_shard(ckpt)
    edit_header(f, edit)
    named_by_verify_and_load(capsys, ckpt, f"{f}: corrupt header entry for tensor '{EMBED}': {problem}")


def test_an_unknown_dtype_is_named_as_such(ckpt, capsys):
    f = first_shard(ckpt)
    edit_header(f, set_field("dtype", "F4"))
    rc, out = verify(capsys, ckpt)
    assert rc == 1 and out[0].startswith(f"corrupt: {f}: tensor '{EMBED}' has unsupported dtype F4 (known: F64, ")


@pytest.mark.parametrize("shard,problem", [
    (5, "5 is not a file name"),
    (None, "null is not a file name"),
    ("../other/model.safetensors", "names a file outside the checkpoint directory"),
    ("/etc/passwd", "names a file outside the checkpoint directory"),
    ("", "not a file name"),
])
def test_a_bad_weight_map_value_is_named_with_its_key(ckpt, capsys, shard, problem):
    index = json.loads((ckpt / INDEX).read_text())
    index["weight_map"][EMBED] = shard
    (ckpt / INDEX).write_text(json.dumps(index))
    named_by_verify_and_load(capsys, ckpt, f"{ckpt / INDEX}: weight_map entry '{EMBED}': {problem}")


GOOD_SHA = "ab" * 32


@pytest.mark.parametrize("files,problem", [
    ({"config.json": {"size": True, "sha256": GOOD_SHA}}, ("entry 'config.json': 'size' must be a non-negative "
                                                           "integer, got true")),
    ({"config.json": {"size": -1, "sha256": GOOD_SHA}}, ("entry 'config.json': 'size' must be a non-negative "
                                                         "integer, got -1")),
    ({"config.json": {"size": 1, "sha256": None}}, "entry 'config.json': 'sha256' must be 64 hex digits, got null"),
    ({"config.json": {"size": 1, "sha256": "x"}}, "entry 'config.json': 'sha256' must be 64 hex digits, got \"x\""),
    ({"config.json": {"size": 1, "git_sha1": GOOD_SHA}}, "entry 'config.json': 'git_sha1' must be 40 hex digits"),
    ({"config.json": {"size": 1}}, "entry 'config.json': no hash ('sha256' or 'git_sha1')"),
    ({"config.json": 7}, "entry 'config.json': expected {size, sha256 | git_sha1}"),
    ({"../ckpt2/config.json": {"size": 1, "sha256": GOOD_SHA}}, ("entry '../ckpt2/config.json': names a file "
                                                                 "outside the checkpoint directory")),
    ({"/etc/hostname": {"size": 1, "sha256": GOOD_SHA}}, "entry '/etc/hostname': names a file outside"),
    ({".": {"size": 1, "sha256": GOOD_SHA}}, "entry '.': not a file name"),
])
def test_a_bad_manifest_entry_is_named(ckpt, capsys, files, problem):
    (ckpt / MANIFEST).write_text(json.dumps({"format": "qwen35-manifest/1", "source": "local", "files": files}))
    rc, out = verify(capsys, ckpt)
    assert rc == 1 and out[0].startswith(f"{ckpt / MANIFEST}: {problem}"), out


@pytest.mark.parametrize("text", ["[]", '"x"', '{"format": "qwen35-manifest/1", "files": []}'])
def test_a_manifest_of_the_wrong_shape_is_named(ckpt, capsys, text):
    (ckpt / MANIFEST).write_text(text)
    rc, out = verify(capsys, ckpt)
    assert rc == 1 and out[0].startswith(f"{ckpt / MANIFEST}: not a qwen35-manifest/1 manifest"), out


def test_a_manifest_with_uppercase_hashes_checks(ckpt, capsys):
    assert main(["verify", str(ckpt), "--write-manifest"]) == 0
    m = json.loads((ckpt / MANIFEST).read_text())
    for v in m["files"].values():
        v["sha256"] = v["sha256"].upper()  # as some tools print them
    (ckpt / MANIFEST).write_text(json.dumps(m))
    capsys.readouterr()
    rc, out = verify(capsys, ckpt)
    assert rc == 0 and f"{len(m['files'])} file(s) match" in out[-1]
    assert all(v["sha256"].islower() for v in read_manifest(ckpt / MANIFEST)["files"].values())


@pytest.fixture(scope="module")
def head_dim_16(tmp_path_factory):
    d = tmp_path_factory.mktemp("hd16") / "ckpt"
    build_replica(d, "tiny", layers=4, seed=2, **{**SMALL, "head_dim": 16})
    return d


def test_q8_0_kv_cache_is_refused_at_load_for_a_head_dim_it_cannot_block(head_dim_16, tmp_path):
    with pytest.raises(QuantError, match=r"^a q8_0 KV cache needs head_dim a multiple of 32, got 16$"):
        qwen35.load_model(head_dim_16, kernels=False, kv_cache="q8_0")
    # from the config alone, before any weight is read: without the weights it is still this error
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(head_dim_16 / "config.json", bare / "config.json")
    with pytest.raises(QuantError, match="needs head_dim a multiple of 32, got 16"):
        qwen35.load_model(bare, kernels=False, kv_cache="q8_0")
    assert qwen35.load_model(head_dim_16, kernels=False).kv_cache == "bf16"  # the model itself is fine


def test_q8_0_kv_cache_is_refused_at_load_for_a_gguf(head_dim_16, tmp_path):
    from qwen35.gguf import export_gguf

    (gguf,) = export_gguf(qwen35.load_model(head_dim_16, kernels=False), tmp_path / "m.gguf", "f32")
    with pytest.raises(QuantError, match="needs head_dim a multiple of 32, got 16"):
        qwen35.load_model(gguf, kernels=False, kv_cache="q8_0")


@pytest.mark.parametrize("text", ["[1, 2]", '{"text_config": 5, "model_type": "qwen3_5"}'])
def test_a_config_of_the_wrong_shape_is_named(tmp_path, text):
    """config.json that is JSON but not an object (or whose text_config is not one): a ConfigError naming
    the file, before the quantization check read it (an AttributeError)."""
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(qwen35.Qwen35Error, match=r"config.json: (expected a JSON object, got list|model_type "
                                                  r"'qwen3_5' needs a 'text_config' object)"):
        qwen35.load_model(tmp_path, kernels=False)
    with pytest.raises(qwen35.Qwen35Error, match="config.json"):
        qwen35.load_model(tmp_path, kernels=False, quant="int4")
