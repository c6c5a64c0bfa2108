"""`qwen35 verify` and `qwen35 download`, offline: sharded replicas and GGUFs with a flipped byte, a missing
shard, a truncated file, a wrong shape; manifests written locally and from a fake hub (never the network)."""

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from qwen35.cli import main
from qwen35.commands.replica import build_replica
from qwen35.manifest import MANIFEST, file_hash, read_manifest

SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
             linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=32, linear_value_head_dim=32,
             vocab_size=256)
BUNDLED = Path(__file__).resolve().parent.parent / "qwen35" / "assets" / "model"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    d = tmp_path_factory.mktemp("verify") / "ckpt"
    build_replica(d, "tiny", layers=4, seed=1, shard_bytes=120_000, **SMALL)
    shutil.copy(BUNDLED / "tokenizer.json", d / "tokenizer.json")
    return d


@pytest.fixture
def ckpt(sharded, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(sharded, d)
    assert main(["verify", str(d), "--write-manifest"]) == 0
    return d


def shards(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def run(capsys, *argv) -> tuple[int, list[str]]:
    rc = main(["verify", *map(str, argv)])
    return rc, capsys.readouterr().out.strip().splitlines()


def test_a_good_checkpoint_verifies_with_its_manifest(ckpt, capsys):
    assert len(shards(ckpt)) >= 3
    m = read_manifest(ckpt / MANIFEST)
    assert set(m["files"]) == {f.name for f in ckpt.iterdir() if f.name != MANIFEST}
    for name, v in m["files"].items():
        assert v["sha256"] == hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
    rc, out = run(capsys, ckpt)
    assert rc == 0 and len(out) == 1
    assert f"OK: {len(shards(ckpt))} weight file(s)" in out[0] and f"{len(m['files'])} file(s) match" in out[0]


def test_a_flipped_byte_is_named(ckpt, capsys):
    f = shards(ckpt)[1]
    raw = bytearray(f.read_bytes())
    raw[-10] ^= 0x01  # inside the last tensor's data: the header still parses
    f.write_bytes(bytes(raw))
    rc, out = run(capsys, ckpt)
    assert rc == 1
    assert out[0].startswith(f"corrupt: {f.name}: sha256 ") and "differs from the manifest's" in out[0]
    assert out[-1] == f"{ckpt}: 1 problem(s)"


def test_a_missing_shard_is_named(ckpt, capsys):
    f = shards(ckpt)[0]
    f.unlink()
    rc, out = run(capsys, ckpt)
    assert rc == 1
    assert f"missing: {f.name} (named by model.safetensors.index.json)" in out
    assert f"missing: {f.name} (listed in the manifest)" in out
    assert not any(line.startswith("missing tensor") for line in out)  # explained by the shard


def test_a_truncated_file_is_named(ckpt, capsys):
    f = shards(ckpt)[-1]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    rc, out = run(capsys, ckpt)
    assert rc == 1
    assert any(line.startswith(f"corrupt: {f}: truncated file: tensor '") for line in out), out
    assert f"corrupt: {f.name} has {len(data) - 100} bytes, the manifest says {len(data)}" in out


def test_shapes_are_checked_against_the_config_without_a_manifest(ckpt, capsys):
    (ckpt / MANIFEST).unlink()
    rc, out = run(capsys, ckpt)
    assert rc == 0 and "hashes not checked" in out[0]
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 192
    (ckpt / "config.json").write_text(json.dumps(cfg))
    rc, out = run(capsys, ckpt)
    assert rc == 1
    assert "shape: 'model.language_model.layers.0.mlp.gate_proj.weight' is [128, 64], the config implies [192, 64]" in out
    assert len(out) == 3 * 5 + 1  # gate, up and down of 4 layers and the MTP layer, then the count


def test_write_manifest_refuses_a_corrupted_copy(ckpt, capsys):
    f = shards(ckpt)[0]
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF
    f.write_bytes(bytes(raw))
    before = (ckpt / MANIFEST).read_text()
    rc, out = run(capsys, ckpt, "--write-manifest")
    assert rc == 1 and out[0].startswith(f"corrupt: {f.name}: sha256")
    assert (ckpt / MANIFEST).read_text() == before


def test_gguf_split_parts_missing_truncated_and_flipped(ckpt, tmp_path, capsys):
    from qwen35.gguf import export_gguf
    from qwen35.weights import load_model

    (tmp_path / "g").mkdir()
    parts = export_gguf(load_model(ckpt, dtype=torch.bfloat16, kernels=False), tmp_path / "g" / "m.gguf", "bf16",
                        split_max_bytes=150_000)
    assert len(parts) >= 3
    assert main(["verify", str(parts[0]), "--write-manifest"]) == 0
    assert set(read_manifest(tmp_path / "g" / MANIFEST)["files"]) == {p.name for p in parts}
    rc, out = run(capsys, parts[1])
    assert rc == 0 and f"{len(parts)} file(s) match" in out[-1]

    raw = bytearray(parts[1].read_bytes())
    raw[-3] ^= 0x10
    parts[1].write_bytes(bytes(raw))
    rc, out = run(capsys, parts[0])
    assert rc == 1 and out[0].startswith(f"corrupt: {parts[1].name}: sha256")

    data = parts[2].read_bytes()
    parts[2].write_bytes(data[:-64])
    rc, out = run(capsys, parts[0])
    assert rc == 1 and "file is truncated: tensor" in out[0] and parts[2].name in out[0]

    parts[-1].unlink()
    rc, out = run(capsys, parts[0])
    assert rc == 1 and out[0].startswith("missing: ") and f"part {parts[-1].name} is missing" in out[0]


def test_bad_manifest_and_path_are_named(ckpt, tmp_path, capsys):
    assert main(["verify", str(ckpt), "--manifest", str(tmp_path / "none.json")]) == 1
    (tmp_path / "bad.json").write_text('{"files": []}')
    rc, out = run(capsys, ckpt, "--manifest", tmp_path / "bad.json")
    assert rc == 1 and "not a qwen35-manifest/1 manifest" in out[0]
    rc, out = run(capsys, tmp_path / "nothing")
    assert rc == 1 and out[0] == f"missing: {tmp_path / 'nothing'} does not exist"


def fake_hub(src: Path, monkeypatch, corrupt: str | None = None, sha: str = "c0ffee"):
    """huggingface_hub's model_info / hf_hub_download, served from `src` as commit `sha`: LFS records (sha256)
    for the safetensors and tokenizer.json, git blob ids for the rest, as the hub publishes them."""
    import huggingface_hub
    from huggingface_hub.hf_api import BlobLfsInfo, RepoSibling

    calls = []

    def sibling(f: Path) -> RepoSibling:
        size = f.stat().st_size
        if f.suffix == ".safetensors" or f.name == "tokenizer.json":
            return RepoSibling(f.name, size, "0" * 40, BlobLfsInfo(size, hashlib.sha256(f.read_bytes()).hexdigest(), 134))
        return RepoSibling(f.name, size, hashlib.sha1(b"blob %d\0" % size + f.read_bytes()).hexdigest())

    class Api:
        def model_info(self, repo, revision=None, files_metadata=False):
            assert files_metadata and repo == "org/model"
            return SimpleNamespace(sha=sha, siblings=[sibling(f) for f in sorted(src.iterdir())
                                                          if f.name != MANIFEST])

    def download(repo, filename, revision=None, local_dir=None):
        calls.append((filename, revision))
        data = (src / filename).read_bytes()
        if filename == corrupt:
            data = data[:-1] + bytes([data[-1] ^ 1])
        (Path(local_dir) / filename).write_bytes(data)
        return str(Path(local_dir) / filename)

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return calls


def test_download_records_the_hubs_hashes_and_verifies(sharded, tmp_path, monkeypatch, capsys):
    calls = fake_hub(sharded, monkeypatch)
    out = tmp_path / "dl"
    assert main(["download", "org/model", str(out)]) == 0
    assert "downloaded and verified" in capsys.readouterr().out.splitlines()[-1]
    m = read_manifest(out / MANIFEST)
    assert m["source"] == "hub:org/model@c0ffee"
    assert {n for n, _ in calls} == set(m["files"]) and {r for _, r in calls} == {"c0ffee"}
    assert set(m["files"]["config.json"]) == {"size", "git_sha1"}
    assert m["files"]["config.json"]["git_sha1"] == file_hash(out / "config.json", "git_sha1")
    shard = shards(out)[0].name
    assert m["files"][shard]["sha256"] == file_hash(out / shard, "sha256")
    assert main(["verify", str(out)]) == 0


def test_download_names_a_corrupted_transfer(sharded, tmp_path, monkeypatch, capsys):
    bad = shards(sharded)[1].name
    fake_hub(sharded, monkeypatch, corrupt=bad)
    assert main(["download", "org/model", str(tmp_path / "dl")]) == 1
    out = capsys.readouterr().out
    assert f"corrupt: {bad}: sha256 " in out and "1 problem(s) after download" in out


def test_download_include_filters_files(sharded, tmp_path, monkeypatch):
    calls = fake_hub(sharded, monkeypatch)
    assert main(["download", "org/model", str(tmp_path / "dl"), "--include", "*.json"]) == 1  # no weights: named
    assert all(n.endswith(".json") for n, _ in calls)
    assert main(["download", "org/model", str(tmp_path / "d2"), "--include", "*.gguf"]) == 1


def test_download_include_adds_to_the_manifest_of_an_earlier_download(sharded, tmp_path, monkeypatch, capsys):
    """A second download into the same directory keeps the hashes of the first: the manifest was replaced by
    the `--include`d file's alone, and verify then passed a corrupted shard it no longer listed."""
    fake_hub(sharded, monkeypatch)
    out = tmp_path / "dl"
    assert main(["download", "org/model", str(out)]) == 0
    everything = read_manifest(out / MANIFEST)["files"]
    capsys.readouterr()
    assert main(["download", "org/model", str(out), "--include", "config.json"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith(f"({len(everything)} files match the hub's hashes)")
    assert read_manifest(out / MANIFEST)["files"] == everything
    f = shards(out)[1]
    raw = bytearray(f.read_bytes())
    raw[-5] ^= 0xFF
    f.write_bytes(bytes(raw))
    rc, lines = run(capsys, out)
    assert rc == 1 and lines[0].startswith(f"corrupt: {f.name}: sha256 ")


def test_write_manifest_keeps_a_downloads_records_and_source(sharded, tmp_path, monkeypatch, capsys):
    """--write-manifest into a hub download adds the files the hub did not send and keeps the hub's records
    (repo@commit, git blob ids): it had rewritten all of them as 'local', so a later `download --include`
    into the folder was refused as another source."""
    fake_hub(sharded, monkeypatch)
    out = tmp_path / "dl"
    assert main(["download", "org/model", str(out)]) == 0
    before = read_manifest(out / MANIFEST)
    (out / "notes.txt").write_text("mine")
    assert main(["verify", str(out), "--write-manifest"]) == 0
    after = read_manifest(out / MANIFEST)
    assert after["source"] == "hub:org/model@c0ffee"
    assert {k: v for k, v in after["files"].items() if k != "notes.txt"} == before["files"]
    assert after["files"]["notes.txt"]["sha256"] == file_hash(out / "notes.txt", "sha256")
    assert main(["download", "org/model", str(out), "--include", "config.json"]) == 0
    (out / "notes.txt").write_text("changed")
    capsys.readouterr()
    rc, lines = run(capsys, out)
    assert rc == 1 and lines[0].startswith("corrupt: notes.txt")


def test_download_refuses_a_directory_holding_another_commit(sharded, tmp_path, monkeypatch, capsys):
    out = tmp_path / "dl"
    fake_hub(sharded, monkeypatch)
    assert main(["download", "org/model", str(out)]) == 0
    before = (out / MANIFEST).read_text()
    calls = fake_hub(sharded, monkeypatch, sha="bada55")  # main moved on since
    capsys.readouterr()
    assert main(["download", "org/model", str(out), "--include", "config.json"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"qwen35: error: {out / MANIFEST} records files of 'hub:org/model@c0ffee', not 'hub:org/model@bada55': "
        f"download into another directory, or delete {MANIFEST} there to start over (--revision c0ffee adds "
        f"files of the commit it holds)")
    assert calls == [] and (out / MANIFEST).read_text() == before  # refused before anything was written


def test_download_refuses_a_directory_with_a_local_manifest(ckpt, sharded, monkeypatch, capsys):
    fake_hub(sharded, monkeypatch)
    before = (ckpt / MANIFEST).read_text()
    capsys.readouterr()
    assert main(["download", "org/model", str(ckpt), "--include", "config.json"]) == 1
    assert "records files of 'local', not 'hub:org/model@c0ffee'" in capsys.readouterr().err
    assert (ckpt / MANIFEST).read_text() == before
