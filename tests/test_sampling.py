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
])
def test_invalid_params_name_the_parameter(kw, name):
    with pytest.raises(SamplingError, match=rf"^{name}="):
        SamplingParams(**kw)


def test_segmented_argmax_is_torch_argmax():
    """sampling.argmax (the largest of 8 segments' maxima) picks torch's index: the first maximum, NaN first."""
    from qwen35.sampling import argmax

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
