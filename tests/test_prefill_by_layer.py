"""Layer-by-layer prefill (Qwen35ForCausalLM.prefill_by_layer): what chunk-by-chunk prefill computes, bit for
bit, with each quantized weight dequantized once per prompt (quant/weight.dequantized_once)."""

import pytest
import torch

import qwen35
import qwen35.generation as G
from qwen35.quant.weight import QuantizedWeight, dequantized_once


@pytest.fixture(scope="module", params=[None, "int4", "q8_0"])
def model(request, vlm_replicas):
    return qwen35.load_model(vlm_replicas[3][1], dtype=torch.bfloat16, quant=request.param)


def _prefill(model, monkeypatch, by_layer: bool, prefix, ids, chunk):
    monkeypatch.setattr(G, "PREFILL_BY_LAYER", by_layer)
    cache = model.make_cache(ids.shape[0])
    G.prefill(model, prefix, cache, chunk)  # rows already hold tokens: the chunks start past them
    logits = G.prefill(model, ids, cache, chunk)
    after = model(torch.tensor([[3], [4]]), cache=cache, logits_to_keep=1)[:, -1]
    return logits, after, cache


@pytest.mark.parametrize("T, chunk, group", [(70, 16, 16), (33, 32, 16), (40, 8, 16), (75, 8, 3), (72, 8, 3)])
def test_by_layer_equals_by_chunk_bit_for_bit(model, monkeypatch, T, chunk, group):
    """group: chunks per layer-by-layer pass (generation.BY_LAYER_CHUNKS); 75 and 72 tokens in groups of 24
    end on a group of one chunk and on a whole group."""
    monkeypatch.setattr(G, "BY_LAYER_CHUNKS", group)
    gen = torch.Generator().manual_seed(T)
    prefix, ids = torch.randint(0, 320, (2, 5), generator=gen), torch.randint(0, 320, (2, T), generator=gen)
    calls = []
    real = model.prefill_by_layer
    monkeypatch.setattr(model, "prefill_by_layer", lambda *a, **k: calls.append(a) or real(*a, **k))
    a_logits, a_after, a_cache = _prefill(model, monkeypatch, False, prefix, ids, chunk)
    assert not calls
    b_logits, b_after, b_cache = _prefill(model, monkeypatch, True, prefix, ids, chunk)
    groups = -(-T // (group * chunk))
    last_alone = (T - (groups - 1) * group * chunk) <= chunk
    assert len(calls) == groups - last_alone  # the 5-token prefix is one chunk: only the prompt went by layer
    assert torch.equal(a_logits, b_logits) and torch.equal(a_after, b_after)
    assert a_cache.lengths == b_cache.lengths == [5 + T + 1] * 2
    for sa, sb in zip(a_cache.deltanet, b_cache.deltanet):
        assert torch.equal(sa.conv, sb.conv) and torch.equal(sa.recurrent, sb.recurrent)


def test_by_layer_dequantizes_each_weight_once_per_layer(vlm_replicas, monkeypatch):
    from qwen35.quant import weight as qw

    monkeypatch.setattr(qw, "PREFILL_GEMM", "dequantize")  # where prefill dequantizes (AMX machines)
    model = qwen35.load_model(vlm_replicas[3][1], dtype=torch.bfloat16, quant="q8_0")
    counts = {}
    real = QuantizedWeight.dequantize

    def counting(self, *a, **k):
        counts[id(self)] = counts.get(id(self), 0) + 1
        return real(self, *a, **k)

    monkeypatch.setattr(QuantizedWeight, "dequantize", counting)
    ids = torch.randint(0, 320, (1, 64), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(G, "PREFILL_BY_LAYER", False)
    G.prefill(model, ids, model.make_cache(), 16)
    by_chunk = dict(counts)
    counts.clear()
    monkeypatch.setattr(G, "PREFILL_BY_LAYER", True)
    G.prefill(model, ids, model.make_cache(), 16)
    assert by_chunk and set(by_chunk) == set(counts)
    # the budget holds the largest layer dequantized: every weight dequantizes once for the 4 chunks
    assert all(by_chunk[w] == 4 for w in by_chunk)
    assert all(counts[w] == 1 for w in counts)


def test_dequantized_once_keeps_within_its_budget(monkeypatch):
    from qwen35.quant import weight as qw

    monkeypatch.setattr(qw, "PREFILL_GEMM", "dequantize")
    w = QuantizedWeight.quantize("q8_0", torch.randn(64, 96, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(16, 96, generator=torch.Generator().manual_seed(1)).bfloat16()
    plain = w.matmul(x, True)
    with torch.no_grad():
        with dequantized_once(64 * 96 * 2):
            kept = w._kept(torch.bfloat16)
            assert kept is not None and w._kept(torch.bfloat16) is kept
            assert torch.equal(w.matmul(x, True), plain)
        assert w._kept(torch.bfloat16) is None  # dropped on exit
        with dequantized_once(64 * 96 * 2 - 1):
            assert w._kept(torch.bfloat16) is None
            assert torch.equal(w.matmul(x, True), plain)


def test_not_by_layer_while_the_cache_keeps_steps(model):
    cache = model.make_cache()
    assert G.by_layer(model, cache)
    cache.keep_steps()
    assert not G.by_layer(model, cache)


def test_each_layer_pass_goes_through_run(model):
    """generation.prefill hands `run` the thread governor: one call per layer, timed as its share of the tokens,
    so a governor probe on the other thread count costs one layer of a long prompt, not the whole prompt."""
    ids = torch.randint(0, 320, (1, 50), generator=torch.Generator().manual_seed(3))
    works = []
    h = model.prefill_by_layer(ids, model.make_cache(), 16, run=lambda fn, work: works.append(work) or fn())
    assert len(works) == len(model.model.layers) and sum(works) == pytest.approx(50)
    assert torch.equal(h, model.prefill_by_layer(ids, model.make_cache(), 16))
