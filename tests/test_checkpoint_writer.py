"""write_random_checkpoint: the streaming replica writer gives random_tensors' tensors, in official shards."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

import qwen35
import qwen35.checkpoint as ckpt
from qwen35.checkpoint import (
    random_tensor,
    random_tensors,
    shard_name,
    write_checkpoint,
    write_random_checkpoint,
)
from qwen35.config import ModelConfig
from qwen35.shapes import composite_config


def test_writer_matches_random_tensors(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "CHUNK", 1008)  # many pieces per matrix, and tails under 16
    config = composite_config("tiny")
    expect = random_tensors(ModelConfig.from_hf(config), mtp_layers=1, seed=5)
    write_random_checkpoint(config, tmp_path, mtp_layers=1, seed=5, max_shard_bytes=2**21)

    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(dict.fromkeys(index["weight_map"].values()))
    assert len(shards) > 2 and shards == [shard_name(k, len(shards)) for k in range(1, len(shards) + 1)]
    got = {}
    for s in shards:
        part = load_file(tmp_path / s)  # the safetensors library reads our header
        assert all(index["weight_map"][k] == s for k in part)
        got.update(part)
    assert got.keys() == expect.keys()
    for k, t in expect.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k
    assert got["model.language_model.layers.0.linear_attn.A_log"].dtype == torch.float32
    assert got["model.language_model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expect.values())

    model = qwen35.load_model(tmp_path, dtype=torch.bfloat16, kernels=False)
    assert torch.equal(model.model.embed_tokens.weight, expect["model.language_model.embed_tokens.weight"])


def test_pieces_draw_the_values_of_one_draw(monkeypatch):
    """Drawing in CHUNK pieces does not change the values (the rule predates the pieces)."""
    shape = (37, 129)  # 4773 elements: pieces of 1008 and a 741 tail; of 4768 and a 5 tail (joined)
    whole = random_tensor("x.weight", shape, torch.float32, torch.Generator().manual_seed(1))
    for chunk in (1008, 4768):
        monkeypatch.setattr(ckpt, "CHUNK", chunk)
        assert torch.equal(random_tensor("x.weight", shape, torch.float32, torch.Generator().manual_seed(1)), whole)


def test_write_checkpoint_round_trips_every_dtype(tmp_path):
    """write_checkpoint writes the safetensors layout itself: what the library reads back is what went in."""
    g = torch.Generator().manual_seed(0)
    tensors = {"a.qs": torch.randint(-128, 127, (5, 64), generator=g, dtype=torch.int8),
               "a.q4": torch.randint(0, 255, (3, 16), generator=g, dtype=torch.uint8),
               "a.d": torch.randn(5, 2, generator=g).half(), "b": torch.randn(7, generator=g).bfloat16(),
               "c": torch.randn(2, 3, generator=g)[:, 1:], "empty": torch.zeros(0, 4)}  # "c": not contiguous
    write_checkpoint(tensors, {"model_type": "x"}, tmp_path, max_shard_bytes=400)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    got = {}
    for s in dict.fromkeys(index["weight_map"].values()):
        got.update(load_file(tmp_path / s))
    assert len(set(index["weight_map"].values())) > 1 and got.keys() == tensors.keys()
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k


def test_every_tensor_starts_aligned_to_its_element_size(tmp_path):
    """An odd-length fp16 scale array sorted before an fp32 tensor would leave it at an offset torch cannot
    view in place: the writer lays wider dtypes out first, and the tensors read back as written."""
    from qwen35.safetensors_io import SafetensorsReader, read_header

    tensors = {"a.d": torch.ones(3, 3, dtype=torch.float16), "a.qs": torch.ones(5, dtype=torch.uint8),
               "b.norm": torch.arange(7, dtype=torch.float32), "c.w": torch.ones(3, dtype=torch.bfloat16),
               "d.ids": torch.arange(3, dtype=torch.int64)}
    write_checkpoint(tensors, {}, tmp_path)
    shard = tmp_path / shard_name(1, 1)
    entries = read_header(shard)
    assert all(e.start % e.dtype.itemsize == 0 for e in entries.values()), {n: e.start for n, e in entries.items()}
    got = load_file(shard)
    with SafetensorsReader(shard) as r:
        for k, t in tensors.items():
            assert torch.equal(got[k], t) and torch.equal(r.read(entries[k]), t), k
