"""Caller-owned state under failure and misuse: a forward stopped part-way marks its cache (refused until a
restore, never stored for reuse), a row named twice or another model's state is refused before anything
changes, a prompt is checked whole before any of it is fed, and bad SamplingParams fail at construction."""

import copy

import pytest
import torch

import qwen35
from qwen35.cache import CacheError
from qwen35.errors import SamplingError
from qwen35.session import ChatSession

GREEDY = qwen35.SamplingParams(temperature=0, max_tokens=8)


@pytest.fixture(scope="module")
def loaded(chat_model_dir):
    return qwen35.load(chat_model_dir, dtype=torch.float32)


def tokens(model, ids, cache=None, params=GREEDY):
    return [r.token for r in qwen35.generate_step(model, ids, cache=cache, params=params)]


class Interrupt:
    """A forward hook on one layer that raises on its n-th call (a Ctrl-C lands inside a forward)."""

    def __init__(self, layer, n, exc=KeyboardInterrupt):
        self.n, self.exc, self.calls = n, exc, 0
        self.handle = layer.register_forward_hook(self)

    def __call__(self, *_):
        self.calls += 1
        if self.calls == self.n:
            raise self.exc("simulated")

    def remove(self):
        self.handle.remove()


def test_a_forward_stopped_part_way_marks_its_cache(loaded):
    model, tok = loaded
    ids = tok.encode("The quick brown fox jumps over the lazy dog and")
    cache = model.make_cache()
    model(torch.tensor([ids[:4]]), cache=cache)
    before = cache.snapshot()
    hook = Interrupt(model.model.layers[len(model.model.layers) // 2], 1)
    try:
        with pytest.raises(KeyboardInterrupt):
            model(torch.tensor([ids[4:]]), cache=cache)
    finally:
        hook.remove()
    assert cache.interrupted == "KeyboardInterrupt"
    for use in (lambda: model(torch.tensor([ids[4:]]), cache=cache), cache.snapshot, lambda: cache.filter([0])):
        with pytest.raises(CacheError, match=r"left part-way through a forward \(KeyboardInterrupt\)"):
            use()
    cache.restore(before)  # exact again
    assert tokens(model, ids[4:], cache) == tokens(model, ids)


def test_an_interrupted_answer_is_not_kept_for_the_next_turn(loaded):
    model, tok = loaded
    params = qwen35.SamplingParams(temperature=0, max_tokens=20)
    s = ChatSession(model, tok, params=params, enable_thinking=False)
    hook = Interrupt(model.model.layers[1], 8)  # a few decode steps into the answer
    try:
        with pytest.raises(KeyboardInterrupt):
            for _ in s.send("Tell me a story about a cat."):
                pass
    finally:
        hook.remove()
    history = copy.deepcopy(s.messages)
    again = [e.text for e in s.send("And then?")]
    clean = ChatSession(model, tok, params=params, enable_thinking=False)
    clean.messages = copy.deepcopy(history)
    assert [e.text for e in clean.send("And then?")] == again


def test_rows_named_twice_are_refused(loaded):
    model, tok = loaded
    ids = torch.tensor([tok.encode("hello there")] * 2)
    cache = model.make_cache(batch_size=2)
    model(ids, cache=cache)
    with pytest.raises(CacheError, match=r"rows \[0, 0\] name a row twice"):
        cache.filter([0, 0])
    with pytest.raises(CacheError, match="the same cache given twice"):
        qwen35.HybridCache.merge([cache, cache])
    with pytest.raises(CacheError, match="rows must be integers"):
        cache.filter([0.7])
    assert cache.lengths == [ids.shape[1]] * 2  # untouched
    twin = model.make_cache()
    twin.restore(cache.snapshot(rows=[0, 0]))  # a snapshot may copy a row: two sequences from one
    assert twin.batch_size == 2 and twin.lengths == [ids.shape[1]] * 2


def test_another_models_state_is_refused_before_anything_changes(loaded, tmp_path):
    from qwen35.commands.replica import build_replica

    model, tok = loaded
    c = model.config
    build_replica(tmp_path / "other", "tiny", layers=len(model.model.layers), vocab_size=c.vocab_size,
                  linear_num_value_heads=2 * c.linear_num_value_heads, linear_num_key_heads=c.linear_num_key_heads)
    other = qwen35.load_model(tmp_path / "other")
    assert other.config.layer_types == c.layer_types  # the same layer pattern, other shapes
    cache = model.make_cache()
    model(torch.tensor([tok.encode("hello")]), cache=cache)
    foreign = other.make_cache()
    other(torch.tensor([[1, 2, 3]]), cache=foreign)
    rows = cache.rows
    with pytest.raises(CacheError, match="holds Gated DeltaNet state of another model"):
        cache.restore(foreign.snapshot())
    assert cache.rows is rows
    with pytest.raises(CacheError, match="another model"):
        qwen35.HybridCache.merge([cache, foreign])
    with pytest.raises(CacheError, match="restore takes a CacheSnapshot"):
        cache.restore(foreign)
    assert cache.rows is rows


def test_a_prompt_is_checked_whole_before_any_of_it_is_fed(loaded):
    model, tok = loaded
    cache = model.make_cache()
    model(torch.tensor([[1, 2, 3]]), cache=cache)
    bad = list(range(1, 40)) + [model.config.vocab_size + 5]
    with pytest.raises(ValueError, match=rf"token id {model.config.vocab_size + 5} is outside the vocabulary"):
        next(qwen35.generate_step(model, bad, cache=cache, params=GREEDY, prefill_chunk_size=8))
    assert cache.offset == 3
    for prompt, words in (([1.7, 2.2], "integer token ids, got 1.7"), ([True, 2], "integer token ids, got True"),
                          (torch.tensor([1.0, 2.0]), "integer token ids, got dtype torch.float32")):
        with pytest.raises(ValueError, match=words):
            next(qwen35.generate_step(model, prompt, params=GREEDY))
    with pytest.raises(TypeError, match="must be token ids, got bytes"):
        qwen35.generate(model, tok, b"hello", GREEDY)
    import numpy as np

    assert tokens(model, np.array([5, 6, 7])) == tokens(model, [5, 6, 7])  # numpy's integers are ids
    want = "".join(r.text for r in qwen35.stream_generate(model, tok, [5, 6, 7], GREEDY))
    assert "".join(r.text for r in qwen35.stream_generate(model, tok, torch.tensor([[5, 6, 7]]), GREEDY)) == want


@pytest.mark.parametrize("field, value", [
    ("top_k", 2.5), ("max_tokens", 2.5), ("max_tokens", True), ("top_logprobs", 1.5), ("seed", "abc"),
    ("seed", 1.5), ("seed", 2**70), ("temperature", float("inf")), ("temperature", "0.7"),
    ("repetition_penalty", float("inf")), ("logit_bias", {1: float("nan")}), ("stop_token_ids", (1.5,)),
    ("logprobs", "no"), ("max_tokens", None),
])
def test_bad_sampling_params_fail_at_construction(field, value):
    with pytest.raises(SamplingError, match=rf"^{field}="):
        qwen35.SamplingParams(**{field: value})


def test_greedy_with_every_token_masked_is_an_error():
    from qwen35.sampling import Sampler

    x = torch.full((1, 50), float("-inf"))
    with pytest.raises(SamplingError, match="every logit is -inf"):
        Sampler(qwen35.SamplingParams(temperature=0), 50)(x)


def test_small_arguments_are_checked(loaded):
    from qwen35.model.qwen35 import InputError
    from qwen35.ops.fast import bind_kernels
    from qwen35.runtime import set_threads

    model, tok = loaded
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(InputError, match="logits_to_keep must be an integer >= 1"):
        model(ids, logits_to_keep=0)  # h[:, -0:] had been every position
    assert model(ids, logits_to_keep=1).shape[1] == 1
    with pytest.raises(ValueError, match="kernels must be True, False or None"):
        bind_kernels(model, "off")
    with pytest.raises(CacheError, match="batch_size must be an integer >= 0, got -1"):
        model.make_cache(-1)
    cache = model.make_cache()
    for n in (-10, 2.5):
        with pytest.raises(CacheError, match="reserve takes a number of tokens >= 0"):
            cache.reserve(n)
    s = ChatSession(model, tok, params=GREEDY, enable_thinking=False)
    with pytest.raises(TypeError, match="user_text must be a string, got NoneType"):
        next(s.send(None))
    assert s.messages == []
    before = torch.get_num_threads()
    try:
        assert set_threads(None) == before  # None: torch's own choice stays
        for n in (0, 1.5, True):
            with pytest.raises(ValueError, match="threads must be an integer >= 1"):
                set_threads(n)
    finally:
        torch.set_num_threads(before)
