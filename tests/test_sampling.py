"""Every sampling control changes the result when set (so it cannot be silently ignored)."""

import pytest
import torch

import qwen35
from qwen35 import Sampler, SamplingError, SamplingParams, generate_step


@pytest.fixture(scope="module")
def model(vlm_replicas):
    return qwen35.load_model(vlm_replicas[2][1])


def run(model, prompt=(7, 8, 9), **kw):
    kw.setdefault("max_tokens", 12)
    return [s.token for s in generate_step(model, list(prompt), params=SamplingParams(**kw))]


def test_top_k_1_equals_greedy(model):
    assert run(model, temperature=1.5, top_k=1, seed=3) == run(model, temperature=0)


def test_seed_reproduces_and_differs(model):
    a, b, c = run(model, seed=1), run(model, seed=1), run(model, seed=2)
    assert a == b and a != c


def test_explicit_generator(model):
    params = SamplingParams(max_tokens=8)
    s1 = Sampler(params, 320, generator=torch.Generator().manual_seed(5))
    s2 = Sampler(params, 320, generator=torch.Generator().manual_seed(5))
    t1 = [s.token for s in generate_step(model, [1, 2], sampler=s1)]
    assert t1 == [s.token for s in generate_step(model, [1, 2], sampler=s2)]


def test_logit_bias_forces_and_bans(model):
    assert set(run(model, temperature=0, logit_bias={42: 100.0})) == {42}
    greedy = run(model, temperature=0)
    banned = run(model, temperature=0, logit_bias={greedy[0]: -100.0})
    assert banned[0] != greedy[0]
    with pytest.raises(SamplingError, match="logit_bias token id 999 is outside the vocabulary"):
        run(model, logit_bias={999: 1.0})


def test_presence_penalty_counts_generated_tokens_only():
    logits = torch.zeros(1, 10)
    logits[0, 3] = 1.0
    s = Sampler(SamplingParams(temperature=0, presence_penalty=2.0), 10, prompt_tokens=[[3, 3, 3]])
    assert int(s(logits)) == 3  # in the prompt only: not penalised
    s.observe(torch.tensor([3]))
    assert s.process(logits)[0, 3] == -1.0 and int(s(logits)) != 3


def test_frequency_penalty_scales_with_count():
    s = Sampler(SamplingParams(frequency_penalty=0.5), 5)
    for _ in range(3):
        s.observe(torch.tensor([2]))
    assert torch.allclose(s.process(torch.zeros(1, 5)), torch.tensor([[0, 0, -1.5, 0, 0]]))


def test_repetition_penalty_includes_prompt():
    s = Sampler(SamplingParams(repetition_penalty=2.0), 4, prompt_tokens=[[1, 2]])
    out = s.process(torch.tensor([[1.0, 4.0, -4.0, 4.0]]))
    assert torch.equal(out, torch.tensor([[1.0, 2.0, -8.0, 4.0]]))


def test_presence_and_frequency_penalties_exact_logits():
    # token 4 generated three times, token 1 once, token 2 only in the prompt: presence subtracts 2.0 once
    # per generated token, frequency 0.5 per occurrence (values exact in binary, so torch.equal)
    s = Sampler(SamplingParams(presence_penalty=2.0, frequency_penalty=0.5), 6, prompt_tokens=[[2, 2]])
    for t in (4, 1, 4, 4):
        s.observe(torch.tensor([t]))
    logits = torch.tensor([[1.0, 3.0, 5.0, -1.0, 0.25, 0.0]])
    expected = torch.tensor([[1.0, 3.0 - 2.0 - 0.5, 5.0, -1.0, 0.25 - 2.0 - 3 * 0.5, 0.0]])
    assert torch.equal(s.process(logits), expected)


def test_greedy_presence_penalty_is_the_penalised_argmax(model):
    """Each step picks argmax(logits - 2.0 * [token generated before]), the logits recomputed from the
    whole sequence (a naive reference beside the cached sampler)."""
    prompt = [7, 8, 9]
    penalised = run(model, prompt, temperature=0, max_tokens=30, presence_penalty=2.0)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(30):
            logits = model(torch.tensor([seq]))[0, -1]
            logits[sorted(set(seq[len(prompt):]))] -= 2.0  # once per distinct generated token, not prompt
            seq.append(int(logits.argmax()))
    assert penalised == seq[len(prompt):]
    assert penalised != run(model, prompt, temperature=0, max_tokens=30)  # the penalty changed this run


def test_top_p_and_min_p_filter_the_tail():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = lambda **kw: {int(Sampler(SamplingParams(seed=i, **kw), 4)(logits)) for i in range(200)}  # noqa: E731
    assert draws() == {0, 1, 2, 3}
    assert draws(top_p=0.7) == {0, 1}
    assert draws(min_p=0.5) == {0, 1}
    assert draws(top_k=3) == {0, 1, 2}


def test_temperature_sharpens():
    logits = torch.log(torch.tensor([[0.6, 0.4]]))
    hot = sum(int(Sampler(SamplingParams(seed=i, temperature=1.0), 2)(logits)) for i in range(300))
    cold = sum(int(Sampler(SamplingParams(seed=i, temperature=0.2), 2)(logits)) for i in range(300))
    assert cold < hot / 2


def test_tiny_temperature_and_top_p_are_their_limits():
    """A temperature or top_p above 0 but tiny (1e-40, 1e-300) is its limit: the top token only (a tie: its
    tokens). Dividing the logits first had overflowed to inf (then NaN), and a top_p that fp32 holds as 0 had
    kept no token at all: "cannot draw a token" and a 500 from the server."""
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0 - 1e-6, -float("inf")]])
    for kw in (dict(temperature=1e-40), dict(temperature=1e-300), dict(top_p=1e-40), dict(top_p=1e-300),
               dict(temperature=1e-300, top_p=1e-300, top_k=3, min_p=0.5)):
        s = Sampler(SamplingParams(seed=0, **kw), 5)
        assert s.distribution(logits).tolist() == [[0.0, 1.0, 0.0, 0.0, 0.0]], kw
        assert int(s(logits)) == 1, kw
    tie = torch.tensor([[3.0, 1.0, 3.0]])
    assert Sampler(SamplingParams(temperature=1e-300), 3).distribution(tie).tolist() == [[0.5, 0.0, 0.5]]


def test_logprobs(model):
    steps = list(generate_step(model, [1, 2, 3], params=SamplingParams(temperature=0, max_tokens=3, logprobs=True,
                                                                        top_logprobs=3)))
    ids = [1, 2, 3]
    for s in steps:
        logp = model(torch.tensor([ids]))[0, -1].log_softmax(-1)
        assert abs(s.logprob - float(logp[s.token])) <= 1e-4
        assert s.top_logprobs[0][0] == s.token and len(s.top_logprobs) == 3
        assert s.top_logprobs[0][1] >= s.top_logprobs[1][1] >= s.top_logprobs[2][1]
        ids.append(s.token)
    assert all(s.logprob is None for s in generate_step(model, [1], params=SamplingParams(max_tokens=2)))


@pytest.mark.parametrize("kw,name", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(min_p=1.5), "min_p"), (dict(presence_penalty=3), "presence_penalty"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(max_tokens=0), "max_tokens"),
    (dict(top_logprobs=50), "top_logprobs"),
    (dict(temperature=10**400), "temperature"),  # an int past float's range (math.isfinite overflows on it)
])
def test_invalid_params_name_the_parameter(kw, name):
    with pytest.raises(SamplingError, match=rf"^{name}="):
        SamplingParams(**kw)


def _top_k_kernel(kernel, request):
    """Which top-k kernel selection runs: "avx512" (top_k_rows: the machine's default here), "portable"
    (portable_top_k_rows, as on a CPU without AVX512: conftest's without_avx512), or "torch" (none: torch's own
    ops)."""
    from qwen35 import selection
    from qwen35.ops import kernels

    if kernel == "portable":
        request.getfixturevalue("without_avx512")
    elif kernel == "torch":
        request.getfixturevalue("monkeypatch").setattr(selection, "_kernel_ready", lambda x: None)
    elif not kernels.available():
        pytest.skip("AVX512 kernels unavailable")


@pytest.mark.parametrize("which", ["argmax", "portable argmax", "segmented_argmax"])
def test_argmax_is_torch_argmax(which, request):
    """selection.argmax (the top-1 kernel where it can run: the AVX512 library's or the portable one's) and
    segmented_argmax (the largest of 8 segments' maxima) pick torch's index: the first maximum, NaN first."""
    from qwen35 import selection

    if which == "portable argmax":
        _top_k_kernel("portable", request)
    argmax = getattr(selection, which.split()[-1])
    gen = torch.Generator().manual_seed(0)
    for trial in range(300):
        V = (248320, 4096, 4100, 100)[trial % 4]
        x = torch.randint(-3, 3, (3, V), generator=gen).float()  # many ties
        if trial % 5 == 0:
            x[0, torch.randint(0, V, (1,), generator=gen)] = float("nan")
        if trial % 7 == 0:
            x[1, torch.randint(0, V, (2,), generator=gen)] = float("nan")
        if trial % 11 == 0:
            x[2] = float("-inf")
        if trial % 13 == 0:
            x[2, 5] = x[2, V - 3] = float("inf")
        assert torch.equal(argmax(x), x.argmax(-1)), trial
    rows = torch.randn(4, 3, 248320, generator=gen)[:, -1]  # a strided view, as logits[:, -1] gives
    assert torch.equal(argmax(rows), rows.argmax(-1))


def _logits(gen, V, kind):
    """Rows of logits of one kind: continuous, many ties, -inf masks (a grammar), a few finite values."""
    if kind == "randn":
        return torch.randn(1, V, generator=gen) * 3
    if kind == "ties":
        return torch.randint(-4, 4, (1, V), generator=gen).float()
    x = torch.randn(1, V, generator=gen) * 2
    keep = torch.rand(1, V, generator=gen) < (0.3 if kind == "masked" else 8 / V)
    return x.masked_fill(~keep, float("-inf"))


PARAMS = [dict(temperature=0.7, top_k=20, top_p=0.8), dict(temperature=1.0, top_k=20, top_p=0.95, presence_penalty=1.5),
          dict(temperature=0.6, top_p=0.9), dict(top_p=0.5, min_p=0.05), dict(min_p=0.1), dict(temperature=1.3),
          dict(top_k=1), dict(top_k=5, min_p=0.2, repetition_penalty=1.3), dict(top_k=200, frequency_penalty=0.7),
          dict(top_p=0.3, logit_bias={3: 2.5, 7: -100.0}, presence_penalty=-0.5)]


@pytest.mark.parametrize("kernel", ["avx512", "portable", "torch"])
@pytest.mark.parametrize("V", [10, 4100, 248320])
def test_distribution_equals_the_whole_vocabulary_reference(V, kernel, request):
    """Sampler.distribution (penalties at their ids, top-k / top-p / min-p from a top-k) gives the probabilities
    of reference_distribution (the formulas over the whole vocabulary, a stable sort for top-p, float64),
    with ties, -inf masks, penalties, biases and a speculative draft's pending tokens: the same support, the
    same values to fp32 rounding. Where a top-p boundary falls inside a run of equal logits, rounding alone
    decides how much of the run stays: there the supports may differ by a token of that run, nothing else."""
    _top_k_kernel(kernel, request)
    gen = torch.Generator().manual_seed(V)
    for n, kw in enumerate(PARAMS):
        for kind in ("randn", "ties", "masked", "few"):
            s = Sampler(SamplingParams(**kw), V, prompt_tokens=[[1, 2, 2, 5]])
            for t in torch.randint(0, V, (6,), generator=gen).tolist() + [2, 2]:
                s.observe(torch.tensor([t]))
            pending = torch.randint(0, V, (3,), generator=gen).tolist() + [2]
            for pend in ((), pending):
                x = _logits(gen, V, kind)
                fast, ref = s.distribution(x, pend), s.reference_distribution(x, pend)
                differ = (fast > 0) != (ref > 0)
                if differ.any():
                    y = s.process(x, pend) / s.params.temperature
                    assert kind == "ties" and int(differ.sum()) == 1, (kw, kind, pend)
                    assert bool((y[differ] == y[ref > 0].min()).all()), (kw, kind, pend)
                else:
                    assert torch.allclose(fast.double(), ref, rtol=2e-6, atol=1e-9), (kw, kind, pend)
                assert torch.equal(s.process(x, pend), s.reference_process(x, pend)), (kw, kind, pend)


def test_draws_follow_the_distribution():
    """Sampler's draws (the kept tokens' running sum inverted at one uniform number) land on each token as
    often as its probability says, never on a token the filters dropped: 20,000 draws, each count within
    5 standard deviations of its expectation."""
    V = 4100
    x = torch.full((1, V), float("-inf"))
    x[0, [7, 100, 101, 2048, 4099]] = torch.tensor([1.0, 0.5, 0.5, -1.0, 0.0])
    s = Sampler(SamplingParams(top_k=4, seed=0), V)
    p = s.distribution(x)[0]
    counts = torch.zeros(V)
    for _ in range(20000):
        counts[int(s(x))] += 1
    n = 20000
    expected = p * n
    assert set(counts.nonzero()[:, 0].tolist()) <= set(p.nonzero()[:, 0].tolist()) == {7, 100, 101, 4099}
    assert bool(((counts - expected).abs() <= 5 * (expected * (1 - p)).sqrt() + 1).all()), (counts[p > 0], expected[p > 0])


@pytest.mark.parametrize("kernel", ["avx512", "portable", "torch"])
def test_top_k_is_a_stable_sort(kernel, request):
    """selection.top_k (a kernel up to KERNEL_TOP_K values: the AVX512 library's or the portable one's, torch's
    topk beyond, and always where no kernel can run) gives the first k of a stable descending sort: equal values
    by ascending id, -inf and inf in place; a row with a NaN as torch.topk."""
    from qwen35.selection import top_k

    _top_k_kernel(kernel, request)

    gen = torch.Generator().manual_seed(1)
    for trial in range(200):
        V = (248320, 4100, 37, 16)[trial % 4]
        y = torch.randint(-6, 6, (V,), generator=gen).float() if trial % 2 else torch.randn(V, generator=gen)
        if trial % 3 == 0:
            y[torch.randint(0, V, (V // 3,), generator=gen)] = float("-inf")
        if trial % 5 == 0:
            y[torch.randint(0, V, (2,), generator=gen)] = float("inf")
        k = (1, 2, 21, 64, 65, 300)[trial % 6] if V > 300 else min(V, (1, 3, 16)[trial % 3])
        vals, ids = top_k(y, k)
        ref_vals, ref_ids = y.sort(descending=True, stable=True)
        assert torch.equal(vals, ref_vals[:k]) and torch.equal(ids, ref_ids[:k]), (trial, V, k)
    y = torch.randn(4100, generator=gen)
    y[17] = float("nan")
    vals, ids = top_k(y, 3)
    ref = y.topk(3)
    assert int(ids[0]) == 17 and torch.equal(vals[1:], ref.values[1:]) and torch.equal(ids[1:], ref.indices[1:])


@pytest.mark.parametrize("n", [4100, 10007, 248320])
def test_draw_over_a_long_row_follows_the_weights(n):
    """selection.draw over a whole vocabulary (two levels past 8 blocks: the block from the blocks' sums, then
    the weight within it) lands on each weight as often as its share says and never on a zero: weights in
    the first block, at a block's edges, in the partial last block; 20,000 draws, within 5 standard deviations."""
    from qwen35.selection import DRAW_BLOCK, draw

    w = torch.zeros(n)
    at = sorted({0, DRAW_BLOCK - 1, DRAW_BLOCK, 3 * DRAW_BLOCK + 7, n - 1, n - 2})
    w[at] = torch.tensor([1.0, 0.5, 2.0, 0.25, 3.0, 1.5][: len(at)])
    g = torch.Generator().manual_seed(n)
    counts = torch.zeros(n)
    for _ in range(20000):
        counts[draw(w, g)] += 1
    p = w / w.sum()
    expected = p * 20000
    assert float(counts[w == 0].sum()) == 0
    assert bool(((counts - expected).abs() <= 5 * (expected * (1 - p)).sqrt() + 1).all()), (counts[at], expected[at])


def test_a_draw_from_broken_logits_names_the_problem():
    """NaN or +inf logits give no distribution to draw from: a SamplingError that says so (torch.multinomial's
    'invalid multinomial distribution' before), for the whole vocabulary and for a top-k / top-p set alike;
    a fully masked row says that instead."""
    x = torch.randn(1, 4100)
    x[0, 7] = float("nan")
    for kw in (dict(), dict(top_k=20), dict(top_p=0.9)):
        with pytest.raises(SamplingError, match=r"^cannot draw a token: the (logits hold NaN|probabilities sum to nan)"):
            Sampler(SamplingParams(seed=0, **kw), 4100)(x)
    x = torch.full((1, 4100), float("-inf"))
    with pytest.raises(SamplingError, match="^no token can be drawn: every logit is -inf"):
        Sampler(SamplingParams(seed=0, top_k=20), 4100)(x)
    with pytest.raises(SamplingError, match="^no token can be drawn: every logit is -inf"):
        Sampler(SamplingParams(seed=0), 4100)(x)


def test_penalties_per_row_of_a_batch():
    """A batch Sampler keeps each row's own counts: process (penalties at each row's ids) equals the
    whole-vocabulary formulas row by row, and the rows differ where their histories do."""
    V = 4100
    s = Sampler(SamplingParams(presence_penalty=1.5, frequency_penalty=0.25, repetition_penalty=1.2), V, 2,
                prompt_tokens=[[1, 2, 3], [4000, 4001]])
    for a, b in ((7, 9), (7, 7), (100, 4099), (2, 3)):
        s.observe(torch.tensor([a, b]))
    x = torch.randn(2, V, generator=torch.Generator().manual_seed(0))
    out = s.process(x)
    assert torch.equal(out, s.reference_process(x))
    assert out[0, 7] != x[0, 7] and out[1, 7] != x[1, 7] and out[0, 100] != x[0, 100] and out[1, 100] == x[1, 100]
    assert out[1, 4000] != x[1, 4000] and out[0, 4000] == x[0, 4000]  # the repetition penalty's prompt ids


def test_stop_ids_outside_the_vocabulary_are_warned_about_once(caplog):
    """Qwen3.5's end ids given to a model of a smaller vocabulary are never sampled, so they stop nothing: a
    warning says so (once per ids and vocabulary), instead of a generation that silently runs to max_tokens."""
    import logging

    params = SamplingParams(stop_token_ids=(100, 3, 101))
    with caplog.at_level(logging.WARNING, logger="qwen35"):
        Sampler(params, 77)
        Sampler(params, 77)
        Sampler(SamplingParams(stop_token_ids=(3, 76)), 77)  # all inside: nothing to say
    said = [r.getMessage() for r in caplog.records]
    assert said == ["stop token ids 100, 101 are outside the vocabulary of 77 ids: never sampled, they stop nothing"]
