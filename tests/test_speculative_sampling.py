"""Speculative sampling draws from exactly the distribution plain sampling draws from (the min(1, p/q) rule
with the residual), checked by chi-square against the exact distribution on a tiny vocabulary; and the
adaptive draft policy's decisions on given acceptance and costs."""

import pytest
import torch

import qwen35
from qwen35 import speculative
from qwen35.cache import HybridCache
from qwen35.commands.replica import build_replica
from qwen35.draft_policy import RoundCosts, SpeculativeStats, choose_k, loses
from qwen35.generation import Stream
from qwen35.sampling import Sampler, speculative_accept

VOCAB = 8
PROMPT = [1, 5, 2, 7, 3]
# penalties, temperature and top-k: the draft and the target must be processed alike for the rule to hold
PARAMS = qwen35.SamplingParams(temperature=1.3, top_k=6, presence_penalty=0.4, max_tokens=3, stop_token_ids=(-1,))


@pytest.fixture(scope="module")
def tiny_vocab(tmp_path_factory):
    """bf16 through the kernels: every verify token is computed exactly as its decode step, so the exact
    distribution below (decode steps) is the one speculative sampling must reproduce."""
    d = tmp_path_factory.mktemp("v8") / "m"
    build_replica(d, "tiny", seed=11, vocab_size=VOCAB, num_hidden_layers=4)
    return qwen35.load_model(d, dtype=torch.bfloat16, kernels=True)


def exact_distributions(model):
    """The joint [t1, t2, t3] of plain sampling, from decode steps after the prompt (no drafts)."""
    cache = model.make_cache()
    with torch.no_grad():
        first = model(torch.tensor([PROMPT]), cache=cache)[0, -1]
    snap = cache.snapshot()

    def probs(prefix):
        s = Sampler(PARAMS, VOCAB, 1, [PROMPT])
        c = model.make_cache()
        c.restore(snap)
        logits = first
        with torch.no_grad():
            for t in prefix:
                s.observe(torch.tensor([t]))
                logits = model(torch.tensor([[t]]), cache=c)[0, -1]
        return s.distribution(logits[None])[0].double()

    p1 = probs(())
    p2 = torch.stack([probs((a,)) for a in range(VOCAB)])  # [t1, t2]
    p3 = torch.stack([probs((a, b)) for a in range(VOCAB) for b in range(VOCAB)]).view(VOCAB, VOCAB, VOCAB)
    return p1[:, None, None] * p2[:, :, None] * p3


def sample_speculative(model, k: int, n: int, batch: int) -> torch.Tensor:
    """n sequences of 3 tokens, rows of one batch drafting and verifying together. Returns [n, 3]."""
    spec = speculative.Speculation(draft_tokens=k)
    cache, mcache = model.make_cache(), model.make_mtp_cache()
    logits, last_h = speculative.prefill(model, PROMPT, cache, mcache, 512)
    snap, msnap = cache.snapshot(), mcache.snapshot()
    out = []
    for _ in range(n // batch):
        cache.restore(snap)  # the same prefill logits for every row
        streams = [Stream.start(model, PROMPT, PARAMS) for _ in range(batch)]
        rows = [spec.new_row(PARAMS) for _ in range(batch)]
        for s, r in zip(streams, rows):
            speculative.start(r, s.sample(logits), last_h)
        c = HybridCache.merge([_restored(model, snap, False) for _ in range(batch)])
        m = HybridCache.merge([_restored(model, msnap, True) for _ in range(batch)])
        live = list(range(batch))
        while live:
            speculative.step(model, c, m, [streams[i] for i in live], [rows[i] for i in live], spec)
            keep = [j for j, i in enumerate(live) if streams[i].finish is None]
            live = [live[j] for j in keep]
            if live:
                c.filter(keep), m.filter(keep)
        out += [s.generated for s in streams]
    assert spec.stats.accepted[0] > 0.2 * spec.stats.drafted[0]  # the rule's both branches run often
    assert spec.stats.accepted[0] < 0.9 * spec.stats.drafted[0]
    return torch.tensor(out)


def _restored(model, snap, mtp: bool) -> HybridCache:
    c = model.make_mtp_cache() if mtp else model.make_cache()
    c.restore(snap)
    return c


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """(statistic, degrees of freedom), cells expected below 5 pooled into one; a cell of probability 0 (cut
    by top-k) must stay empty."""
    n = counts.sum()
    exp = probs.flatten() * n
    obs = counts.flatten().double()
    impossible = probs.flatten() == 0
    assert obs[impossible].sum() == 0, "a token outside top-k was sampled"
    exp, obs = exp[~impossible], obs[~impossible]
    small = exp < 5
    exp = torch.cat([exp[~small], exp[small].sum()[None]]) if small.any() else exp
    obs = torch.cat([obs[~small], obs[small].sum()[None]]) if small.any() else obs
    return float(((obs - exp) ** 2 / exp).sum()), exp.numel() - 1


def p_value(stat: float, df: int) -> float:
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.mark.parametrize("k", [2])
def test_first_tokens_follow_plain_sampling_distribution(tiny_vocab, k):
    torch.manual_seed(1234)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny kernel calls: on a busy machine OpenMP's waits dominate them
    try:
        _check_distribution(tiny_vocab, k)
    finally:
        torch.set_num_threads(threads)


def _check_distribution(tiny_vocab, k):
    joint = exact_distributions(tiny_vocab)
    assert abs(float(joint.sum()) - 1) < 1e-6  # fp32 softmaxes
    N = 10000
    toks = sample_speculative(tiny_vocab, k, N, 20)  # 20 rows x 3 verify tokens: within the kernels' 64
    counts = torch.zeros(VOCAB, VOCAB, VOCAB)
    counts.index_put_((toks[:, 0], toks[:, 1], toks[:, 2]), torch.ones(N), accumulate=True)
    for name, c, p in (("t2", counts.sum((0, 2)), joint.sum((0, 2))),  # verify position 1
                       ("t3", counts.sum((0, 1)), joint.sum((0, 1))),  # verify position 2 or the next round
                       ("t2,t3", counts.sum(0), joint.sum(0))):
        # power: moving 2% of the mass between the two likeliest cells gives a noncentrality of at least 30
        # (the most detectable shift needs less), which the 0.001 test at 7 degrees of freedom rejects with
        # probability ~0.75; any smaller cell's 2% error is more visible
        top = p.flatten().topk(2).values
        assert N * 0.02**2 * float(1 / top[0] + 1 / top[1]) >= 30 or name == "t2,t3"
        stat, df = chi_square(c, p)
        assert p_value(stat, df) > 1e-3, (name, stat, df)


def test_acceptance_rule_alone_is_exact():
    """speculative_accept on fixed p and q (a draft from q, kept with min(1, p/q), else the residual): the
    kept-or-replaced token is distributed as p."""
    g = torch.Generator().manual_seed(7)
    p = torch.tensor([0.5, 0.2, 0.2, 0.1, 0.0])
    q = torch.tensor([0.1, 0.4, 0.1, 0.1, 0.3])
    N = 40000
    counts = torch.zeros(5)
    for _ in range(N):
        d = int(torch.multinomial(q, 1, generator=g))
        counts[speculative_accept(p, q, d, g)[1]] += 1
    assert counts[4] == 0
    stat, df = chi_square(counts[:4], p[:4])
    assert p_value(stat, df) > 1e-3


def test_greedy_drafts_keep_plain_tokens_with_penalties(tiny_vocab):
    """Greedy with penalties: the draft is processed like the target (earlier drafts counted), and the
    tokens stay plain decoding's."""
    params = qwen35.SamplingParams(temperature=0, presence_penalty=1.0, repetition_penalty=1.3, max_tokens=30,
                                   stop_token_ids=(-1,))
    want = [r.token for r in qwen35.generate_step(tiny_vocab, PROMPT, params=params)]
    for k in (1, 3):
        spec = speculative.Speculation(draft_tokens=k)
        assert [r.token for r in qwen35.generate_step(tiny_vocab, PROMPT, params=params, speculative=spec)] == want


def _stats(rounds: int, accepted_first: int) -> SpeculativeStats:
    s = SpeculativeStats()
    for i in range(rounds):
        s.record(2, 1 if i < accepted_first else 0)
    return s


def test_policy_tries_each_k_then_picks_the_fastest():
    costs = RoundCosts()
    good = _stats(20, 18)
    seen = []
    for _ in range(5):  # untried first: 1, 2, 3, 4 (limits), then plain once
        k = choose_k(costs, [good], [4], 4)
        seen.append(k)
        costs.add(1, k, {0: 1.0, 1: 1.1, 2: 1.2, 3: 1.3, 4: 1.4}[k])
    assert seen == [1, 2, 3, 4, 0]
    assert choose_k(costs, [good], [4], 4) >= 1
    assert choose_k(costs, [good], [1], 4) == 1  # a row's own cap (max_tokens) bounds k


def test_policy_turns_drafting_off_when_it_loses():
    costs = RoundCosts()
    for k, t in {0: 1.0, 1: 1.5, 2: 1.7, 3: 1.9, 4: 2.1}.items():
        costs.add(1, k, t)
    assert loses(costs, _stats(4, 0), 1, 4) is None  # too few rounds measured to judge
    why = loses(costs, _stats(10, 0), 1, 4)
    assert why is not None and "slower than plain decoding" in why and "acceptance 0.00" in why
    assert loses(costs, _stats(10, 10), 1, 4) is None  # accepted every time: 1.75+ tokens for 1.5x the time
