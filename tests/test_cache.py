"""Caller-owned caches: growth, sizes, and snapshot/restore at exact token positions."""

import pytest
import torch

import qwen35
from qwen35.cache import KV_GROWTH_STEP, KVCache


@pytest.fixture(scope="module")
def model(vlm_replicas):
    return qwen35.load_model(vlm_replicas[2][1])


def test_kv_cache_grows_in_steps_and_keeps_content():
    c = KVCache(1, 2, 4, torch.float32)
    chunks = [torch.randn(1, 2, n, 4) for n in (3, KV_GROWTH_STEP, 1)]
    for ch in chunks:
        k, v = c.update(ch, -ch)
    assert c.length == KV_GROWTH_STEP + 4 and c.capacity == 2 * KV_GROWTH_STEP
    assert torch.equal(k, torch.cat(chunks, 2)) and torch.equal(v, -torch.cat(chunks, 2))
    assert c.nbytes == 2 * (KV_GROWTH_STEP + 4) * 2 * 4 * 4


def test_snapshot_restore_continues_identically(model):
    x = torch.randint(0, 320, (1, 90), generator=torch.Generator().manual_seed(0))
    cache = model.make_cache()
    model(x[:, :50], cache=cache)
    snap = cache.snapshot()
    after = model(x[:, 50:], cache=cache)
    # diverge with other tokens, then come back to position 50 and redo
    model(torch.randint(0, 320, (1, 30)), cache=cache)
    cache.restore(snap)
    assert cache.offset == 50
    again = model(x[:, 50:], cache=cache)
    assert torch.equal(after, again)
    # the snapshot is independent: restoring twice works
    cache.restore(snap)
    assert torch.equal(model(x[:, 50:], cache=cache), after)


def test_deltanet_state_is_constant_size(model):
    cache = model.make_cache()
    model(torch.randint(0, 320, (1, 10)), cache=cache)
    sizes = [layer.nbytes for i, layer in enumerate(cache.layers) if i not in model.config.full_attention_layers]
    model(torch.randint(0, 320, (1, 200)), cache=cache)
    assert sizes == [layer.nbytes for i, layer in enumerate(cache.layers)
                     if i not in model.config.full_attention_layers]
    kv = [cache.layers[i] for i in model.config.full_attention_layers]
    assert all(layer.length == 210 for layer in kv)
