"""Checkpoint loading: layouts, dtype rules, and an exact, named error for every kind of bad input."""

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import qwen35
from qwen35 import CheckpointError, ConfigError
from qwen35.checkpoint import write_checkpoint

import oracle


@pytest.fixture()
def ckpt(vlm_replicas, tmp_path):
    """A private copy of the sharded VLM replica that a test may damage."""
    dst = tmp_path / "ckpt"
    shutil.copytree(vlm_replicas[1][1], dst)
    return dst


def shard_of(path, key):
    return path / json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][key]


def test_official_layout_is_what_we_load(vlm_replicas):
    path = vlm_replicas[2][1]
    names = sorted(p.name for p in path.glob("*.safetensors"))
    assert names[0] == "model.safetensors-00001-of-00004.safetensors" and len(names) == 4
    model = qwen35.load_model(path, dtype=torch.bfloat16)
    info = model.checkpoint_info
    assert info.layout == "vlm" and len(info.files) == 4
    assert not info.skipped and model.visual is not None  # the vision tower is loaded beside the text model
    layer = model.model.layers[0].linear_attn
    assert layer.A_log.dtype == layer.dt_bias.dtype == layer.norm.weight.dtype == torch.float32
    assert layer.in_proj_qkv.weight.dtype == torch.bfloat16
    assert model.make_cache().layers[0].recurrent.dtype == torch.float32
    # F32 on disk stays bit-exact
    disk = load_file(shard_of(path, "model.language_model.layers.0.linear_attn.A_log"))
    assert torch.equal(layer.A_log, disk["model.language_model.layers.0.linear_attn.A_log"])


def test_zero_centred_norm_is_applied_exactly_once(vlm_replicas):
    model = qwen35.load_model(vlm_replicas[1][1])
    key = "model.language_model.norm.weight"
    disk = load_file(shard_of(vlm_replicas[1][1], key))[key].float()
    norm = model.model.norm
    assert torch.equal(norm.weight, disk)  # stored as on disk: no +1 baked in at load time
    x = torch.randn(3, 64)
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + disk)
    assert torch.allclose(norm(x), expected, atol=1e-6)


def test_float16_load_is_as_accurate_as_fp16_allows(vlm_replicas):
    """fp16 logits within 2x of what fp16 rounding costs transformers itself (its model in fp16), both
    measured from its fp64 logits. Measured here: ours / oracle 0.83-1.05 over 3 replicas x 3 inputs; a
    model silently running bf16 (3 fewer mantissa bits) is 6-9x, a wrong fp16 rule more."""
    hf, path = vlm_replicas[1]
    model = qwen35.load_model(path, dtype=torch.float16)
    assert model.dtype == torch.float16 and model.model.layers[0].linear_attn.A_log.dtype == torch.float32
    x = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(x)
        fp16 = copy.deepcopy(hf).half()(x).logits
        fp64 = oracle.as_fp64(hf)(x).logits
    oracle.assert_within_oracle_noise({"logits": ours}, {"logits": fp16}, {"logits": fp64}, factor=2.0)


def test_missing_config_and_weights(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        qwen35.load_model(tmp_path / "nope")
    with pytest.raises(ConfigError, match="config.json not found"):
        qwen35.load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**__import__("replica").text_config(),
                                                      "model_type": "qwen3_5_text"}))
    with pytest.raises(CheckpointError, match="no weights found in .*model.safetensors"):
        qwen35.load_model(tmp_path)
    with pytest.raises(CheckpointError, match="dtype torch.int8 is not supported"):
        qwen35.load_model(tmp_path, dtype=torch.int8)


def test_missing_shard(ckpt):
    shard_of(ckpt, "lm_head.weight").unlink()
    with pytest.raises(CheckpointError, match="lists shard 'model.safetensors-0000.-of-00004.safetensors', "
                                              "which is missing"):
        qwen35.load_model(ckpt)


def rewrite(ckpt, edit):
    """Load all tensors, apply edit(dict) and write the checkpoint again (same layout)."""
    tensors = {}
    for f in ckpt.glob("*.safetensors"):
        tensors.update(load_file(f))
        f.unlink()
    edit(tensors)
    config = json.loads((ckpt / "config.json").read_text())
    write_checkpoint(tensors, config, ckpt, max_shard_bytes=10**9)


def test_missing_tensor_is_named(ckpt):
    rewrite(ckpt, lambda t: t.pop("model.language_model.layers.3.self_attn.k_norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.language_model.layers.3.self_attn.k_norm.weight'"):
        qwen35.load_model(ckpt)


def test_unexpected_tensor_is_named(ckpt):
    rewrite(ckpt, lambda t: t.update({"model.language_model.layers.0.linear_attn.bogus": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model.language_model.layers.0.linear_attn.bogus'"):
        qwen35.load_model(ckpt)


def test_shape_mismatch_names_both_shapes(ckpt):
    key = "model.language_model.layers.1.mlp.up_proj.weight"
    rewrite(ckpt, lambda t: t.update({key: torch.zeros(95, 64, dtype=torch.bfloat16)}))
    with pytest.raises(CheckpointError, match=rf"shape mismatch for '{key}': checkpoint has \[95, 64\], "
                                              r"the config implies \[96, 64\]"):
        qwen35.load_model(ckpt)


def test_truncated_file(ckpt):
    f = shard_of(ckpt, "lm_head.weight")
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=rf"{f.name}: truncated file: tensor '.*' ends at byte \d+ but the "
                                              rf"file has {len(data) - 100} bytes"):
        qwen35.load_model(ckpt)


@pytest.mark.parametrize("damage,words", [
    (lambda d: d[:5], "no header"),
    (lambda d: (10**12).to_bytes(8, "little") + d[8:], "header claims"),
    (lambda d: d[:8] + b"\xff" * 20 + d[28:], "header is not valid JSON"),
])
def test_corrupt_file(ckpt, damage, words):
    f = shard_of(ckpt, "lm_head.weight")
    f.write_bytes(damage(f.read_bytes()))
    with pytest.raises(CheckpointError, match=rf"{f.name}: .*{words}"):
        qwen35.load_model(ckpt)


def test_untied_config_without_lm_head_falls_back_to_embedding(ckpt, caplog):
    rewrite(ckpt, lambda t: t.pop("lm_head.weight"))
    model = qwen35.load_model(ckpt)
    assert model.lm_head is None and model.head_weight is model.model.embed_tokens.weight
    assert "no lm_head.weight" in caplog.text


def test_text_layout_single_file(tied_replica, tmp_path):
    hf, path = tied_replica
    assert not (path / "lm_head.weight").exists()
    assert "lm_head.weight" not in load_file(path / "model.safetensors")
    model = qwen35.load_model(path)
    assert model.checkpoint_info.layout == "text" and model.checkpoint_info.files[0].name == "model.safetensors"


def test_unexpected_mtp_count_is_reported(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["text_config"]["mtp_num_hidden_layers"] = 2
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="mtp_num_hidden_layers=2 but the checkpoint has 1 mtp.layers"):
        qwen35.load_model(ckpt)


def test_save_then_load_roundtrip(vlm_replicas, tmp_path):
    """Our writer's output loads back to the same logits (what training will rely on)."""
    path = vlm_replicas[3][1]
    tensors = {}
    for f in path.glob("*.safetensors"):
        tensors.update(load_file(f))
    write_checkpoint(tensors, json.loads((path / "config.json").read_text()), tmp_path / "copy")
    a, b = qwen35.load_model(path), qwen35.load_model(tmp_path / "copy")
    x = torch.tensor([[5, 6, 7, 8, 9]])
    assert torch.equal(a(x), b(x))
    assert (tmp_path / "copy" / "model.safetensors-00001-of-00001.safetensors").is_file()


def test_weights_share_one_arena(vlm_replicas):
    model = qwen35.load_model(vlm_replicas[1][1], dtype=torch.bfloat16)
    ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(ptrs) == 1  # one allocation: huge pages need no per-tensor rounding
    assert all(p.data_ptr() % 64 == 0 for p in model.parameters())  # every row stream starts on a cache line


def test_weight_arena(monkeypatch):
    from qwen35.runtime import WeightArena, hugepages_enabled

    shapes = [((3, 5), torch.bfloat16), ((2048, 1024), torch.float32), ((7,), torch.float32)]
    arena = WeightArena(WeightArena.size_of(shapes))
    ts = [arena.take(s, d) for s, d in shapes]
    for t, (s, d) in zip(ts, shapes):
        assert t.shape == s and t.dtype == d and t.data_ptr() % 64 == 0
        t.fill_(1.5)
    assert all(bool((t == 1.5).all()) for t in ts)  # no overlap
    assert arena.huge == hugepages_enabled()
    if arena.huge:
        assert arena.raw.data_ptr() % (2 * 2**20) == 0
    with pytest.raises(ValueError, match="cannot hold 4 more"):
        arena.take((1,), torch.float32)
    monkeypatch.setenv("QWEN35_HUGEPAGES", "0")
    assert not WeightArena(8 * 2**20).huge


def test_quant_at_load_reads_matrices_in_bands(tmp_path, monkeypatch):
    """load_model(quant=) quantizes each matrix a band of rows at a time straight from the mapped file (a
    whole bf16 copy of the 9B head would add 2 GB to the peak), and gives the bytes of quantizing it whole."""
    from qwen35 import placement
    from qwen35.commands.replica import build_replica
    from qwen35.quant import QuantizedWeight, formats
    from qwen35.safetensors_io import SafetensorsReader

    build_replica(tmp_path, "tiny", seed=2)
    monkeypatch.setattr(placement, "QUANT_BAND_BYTES", 96 * 256 * 2)  # 96 rows of K=256: the 4096-row embedding
    # in 43 bands, the last short
    reads = []
    real_read = SafetensorsReader.read
    monkeypatch.setattr(SafetensorsReader, "read", lambda self, e, out=None: reads.append(e) or real_read(self, e, out))
    model = qwen35.load_model(tmp_path, dtype=torch.bfloat16, quant="int4", kernels=False)
    emb = model.model.embed_tokens.weight
    assert isinstance(emb, QuantizedWeight)
    assert max(e.shape[0] for e in reads if e.name.endswith("embed_tokens.weight")) == 96
    assert all(e.nbytes <= 96 * 256 * 2 for e in reads if len(e.shape) == 2)  # every matrix is quantized here
    whole = load_file(tmp_path / "model.safetensors-00001-of-00001.safetensors")
    qs, d = formats.quantize(emb.scheme, whole["model.language_model.embed_tokens.weight"])
    assert torch.equal(emb.qs, qs) and torch.equal(emb.d, d)


@pytest.mark.parametrize("platform,maxrss", [("linux", 3 * 1024), ("darwin", 3 * 1024 * 1024)])
def test_peak_rss_reads_getrusage_in_each_systems_unit(platform, maxrss, monkeypatch):
    """Without /proc (macOS) the peak comes from getrusage, whose ru_maxrss is KiB on Linux and bytes on macOS:
    3 MiB either way, not 3 GiB on a Mac."""
    import resource
    import types

    from qwen35 import runtime

    monkeypatch.setattr(runtime, "_status_mb", lambda field: None)
    monkeypatch.setattr(runtime.sys, "platform", platform)
    monkeypatch.setattr(resource, "getrusage", lambda who: types.SimpleNamespace(ru_maxrss=maxrss))
    assert runtime.peak_rss_mb() == 3.0
