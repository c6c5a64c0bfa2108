"""Speculative decoding with the MTP head: the same tokens as plain decoding, and exact rollback."""

import pytest
import torch

import qwen35
from qwen35.cache import CacheError
from qwen35.commands.replica import build_replica
from qwen35.ops import kernels
from qwen35.speculative import SpeculativeError, SpeculativeStats, speculative_generate_step

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="C++ kernels unavailable")
GREEDY = qwen35.SamplingParams(temperature=0, max_tokens=40, stop_token_ids=(-1,))


def plain(model, ids, params):
    return [r.token for r in qwen35.generate_step(model, ids, params=params)]


def speculative(model, ids, params, k, stats=None):
    return [r.token for r in speculative_generate_step(model, ids, params, k, stats)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("spec") / "tiny"
    build_replica(d, "tiny", seed=3)
    return d


@pytest.fixture(scope="module")
def bundled():
    from qwen35.commands.common import default_model

    return default_model()


@needs_kernels
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_greedy_with_drafts_is_greedy_without_on_the_bundled_model(bundled, k):
    """As users run it (bf16, whole-layer kernels: the verify pass computes each token as its decode step)."""
    model, tok = qwen35.load(bundled, dtype=torch.bfloat16, kernels=True)
    stats = SpeculativeStats()
    for text in ("import os\n\n\ndef main(argv):\n", "class Stack:\n    def push(self, item):\n"):
        ids = tok.encode(text)
        assert speculative(model, ids, GREEDY, k, stats) == plain(model, ids, GREEDY)
    assert stats.rounds and len(stats.drafted) == k
    assert 0 < stats.accepted[0] < stats.drafted[0]  # mixed: some drafts accepted, some rejected


@needs_kernels
@pytest.mark.parametrize("quant", [None, "int4"])
def test_random_replica_bf16_kernels_exact(tiny_dir, quant):
    """Random weights (near-ties everywhere: any rounding difference would show) through the kernels."""
    model = qwen35.load_model(tiny_dir, dtype=torch.bfloat16, kernels=True, quant=quant)
    ids = torch.randint(0, 4000, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    want = plain(model, ids, GREEDY)
    for k in (1, 3):
        assert speculative(model, ids, GREEDY, k) == want


def test_reference_path_fp32_exact_with_more_value_heads(vlm_replicas):
    """The torch reference (fp32), Hv = 2 Hk, untied head: the Gated DeltaNet layers step through the
    verify tokens one by one for their per-token states."""
    _, path = vlm_replicas[2]
    model = qwen35.load_model(path, dtype=torch.float32, kernels=False)
    ids = torch.randint(0, 320, (21,), generator=torch.Generator().manual_seed(2)).tolist()
    want = plain(model, ids, GREEDY)
    for k in (1, 2, 4):
        assert speculative(model, ids, GREEDY, k) == want


@needs_kernels
def test_sampling_with_a_seed_gives_the_same_tokens(bundled):
    """Tokens are sampled from the verify logits with the stream's own sampler, one draw per emitted token
    in the same order: seeded sampling gives exactly the plain run's tokens."""
    model, tok = qwen35.load(bundled, dtype=torch.bfloat16, kernels=True)
    params = qwen35.SamplingParams(temperature=0.8, top_p=0.95, seed=5, max_tokens=40, stop_token_ids=(-1,))
    ids = tok.encode("def parse(path):\n")
    assert speculative(model, ids, params, 3) == plain(model, ids, params)


@pytest.mark.parametrize("use_kernels", [False, True])
def test_rewound_state_equals_never_having_seen_the_rest(tiny_dir, use_kernels):
    if use_kernels and not kernels.available():
        pytest.skip("kernels unavailable")
    dtype = torch.bfloat16 if use_kernels else torch.float32
    model = qwen35.load_model(tiny_dir, dtype=dtype, kernels=use_kernels)
    prompt = torch.randint(0, 4000, (1, 20), generator=torch.Generator().manual_seed(4))
    extra = torch.tensor([[5, 6, 7, 8]])
    a, b = model.make_cache(), model.make_cache()
    with torch.no_grad():
        model(prompt, cache=a)
        model(prompt, cache=b)
        a.keep_steps(True)
        model(extra, cache=a)
        a.rewind([2])
        model(extra[:, :2], cache=b)
        assert a.lengths == b.lengths == [22]
        # the kernels compute each token alike whatever the batch of tokens: bit for bit; torch's reference
        # rounds a 4-row and a 2-row fp32 matmul differently in the last bit
        same = torch.equal if use_kernels else (lambda x, y: torch.allclose(x, y, rtol=1e-5, atol=1e-6))
        for sa, sb in zip(a.deltanet, b.deltanet):
            assert same(sa.conv, sb.conv) and same(sa.recurrent, sb.recurrent)
        a.keep_steps(False)
        nxt = torch.tensor([[9]])
        assert same(model(nxt, cache=a), model(nxt, cache=b))  # the dead KV past 22 is overwritten


def test_rewind_errors(tiny_dir):
    model = qwen35.load_model(tiny_dir, dtype=torch.float32, kernels=False)
    cache = model.make_cache()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
    with pytest.raises(CacheError, match="kept no per-token states"):
        cache.rewind([1])
    cache.keep_steps(True)
    with torch.no_grad():
        model(torch.tensor([[4, 5]]), cache=cache)
    with pytest.raises(CacheError, match=r"keeps 1\.\.2"):
        cache.rewind([3])
    with pytest.raises(CacheError, match="truncate: Gated DeltaNet"):
        cache.truncate([1])
    with pytest.raises(SpeculativeError, match="draft_tokens must be 1..7"):
        list(speculative_generate_step(model, [1, 2], GREEDY, 9))
