"""The prompt cache's memory: what it counts is what its entries keep alive (KV buffers once each, at their
size, plus state and logits), a finished request's unused reserve is given back, a conversation's turns
share one buffer, and eviction keeps the answers of every conversation in flight (prompt_cache.py, cache.py
trim_buffer and in-place growth, engine.py _remember_answer)."""

from __future__ import annotations

import pytest
import torch

import qwen35
from qwen35.prompt_cache import PromptCache
from qwen35.sampling import SamplingParams
from qwen35.server.engine import Engine, Request


@pytest.fixture(scope="module")
def model(chat_model_dir):
    return qwen35.load(chat_model_dir, dtype=torch.float32)[0]


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(10, 4000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def sizes(model) -> tuple[int, int, int]:
    """(KV bytes per token, all attention layers; Gated DeltaNet state bytes of one row; logits bytes)."""
    cache = model.make_cache(batch_size=1)
    cache.reserve(1)
    per_token = sum(b.token_bytes for b in cache.rows[0].kv)
    return per_token, sum(s.nbytes for s in cache.deltanet), model.config.vocab_size * 4


def prefill(model, cache, tokens: list[int]) -> None:
    with torch.no_grad():
        model(torch.tensor([tokens]), cache=cache)


def run(eng: Engine, *reqs: Request) -> None:
    """Each request alone, to its end (the worker's turns driven by hand)."""
    with torch.inference_mode():
        for req in reqs:
            eng.submit(req)
            for _ in range(500):
                if not (eng.active or eng.feeding or eng.waiting):
                    break
                eng._turn_once()


def answer(req: Request) -> list[int]:
    """The tokens its answer snapshot holds: the prompt and every generated token but the last."""
    return req.prompt + [t.token for t in req.out.queue if t.token is not None][:-1]


def test_snapshots_of_one_row_count_their_shared_buffer_once(model):
    """Three snapshots of one row at 10, 20 and 30 tokens keep one buffer alive, not 60 tokens' worth."""
    per_token, state, logits = sizes(model)
    x = ids(30, 1)
    cache = model.make_cache(batch_size=1)
    pc = PromptCache(model, max_bytes=2**40)
    for n in (10, 20, 30):
        prefill(model, cache, x[n - 10 : n])
        pc.store(x[:n], cache, torch.zeros(1, model.config.vocab_size) if n == 30 else None)
    # the row is live (its reserve is its own): the buffer counts as far as the longest entry holds it
    assert pc.nbytes == 30 * per_token + 3 * state + logits
    del cache  # the row is gone: the next store cuts its buffer to what the entries hold
    pc.store_snapshot(x[:10], pc.entries[tuple(x[:10])])
    assert [b.capacity for b in pc.entries[tuple(x)].rows[0].kv] == [30] * len(pc.entries[tuple(x)].rows[0].kv)
    assert pc.nbytes == 30 * per_token + 3 * state + logits


def test_a_finished_request_gives_its_unused_reserve_back(model):
    """A request reserves KV for prompt + max_tokens; its snapshots must not keep the part never generated."""
    per_token, state, logits = sizes(model)
    prompt = ids(40, 2)
    distinct = {"temperature": 0, "presence_penalty": 2.0}  # (this random model repeats one token otherwise)
    probe = Request(prompt, SamplingParams(**distinct, max_tokens=8, stop_token_ids=(-1,)))
    run(Engine(model, prompt_cache_bytes=0, thread=False), probe)
    greedy = [t.token for t in probe.out.queue if t.token is not None]
    k = next(i for i in range(1, 8) if greedy[i] not in greedy[:i])  # a token that ends it there
    eng = Engine(model, prompt_cache_bytes=2**40, thread=False)
    req = Request(prompt, SamplingParams(**distinct, max_tokens=400, stop_token_ids=(greedy[k],)))
    run(eng, req)
    held = answer(req)
    assert len(held) == 40 + k  # of the 40 + 400 reserved (512 slots)
    pc = eng.prompt_cache
    assert list(pc.entries) == [tuple(held), tuple(prompt)] and pc.demoted == {tuple(prompt)}
    bufs = {id(b): b for s in pc.entries.values() for b in s.rows[0].kv}.values()
    assert [b.capacity for b in bufs] == [40 + k] * len(bufs)
    assert pc.nbytes == (40 + k) * per_token + 2 * state + logits


def test_a_conversation_keeps_one_buffer_and_a_cap_holds(model):
    """Turn after turn, each restoring the last answer: one buffer, grown in place, shared by every
    snapshot of the conversation; with a cap, what is counted is what is kept alive."""
    per_token, state, logits = sizes(model)
    eng = Engine(model, prompt_cache_bytes=2**40, thread=False)
    prompt, reqs = ids(30, 3), []
    for turn in range(3):
        req = Request(prompt, SamplingParams(temperature=0, max_tokens=5, stop_token_ids=(-1,)))
        run(eng, req)
        reqs.append(req)
        prompt = answer(req) + ids(6, 10 + turn)
    assert [r.cached_tokens for r in reqs] == [0, 34, 44]
    pc = eng.prompt_cache
    bufs = {id(b): b for s in pc.entries.values() for b in s.rows[0].kv}.values()
    assert len(bufs) == model.cache_layout().num_attention  # one per attention layer, not per turn
    assert [b.capacity for b in bufs] == [54] * len(bufs)  # 30 + 3 x 4 answered + 2 x 6 asked
    assert len(pc.entries) == 6  # each turn's prompt end and answer end
    assert pc.nbytes == 54 * per_token + 6 * state + 3 * logits
    # the cap: room for the buffer, two states and one logits row -> the two newest entries stay
    pc.max_bytes = 54 * per_token + 2 * state + logits
    pc.store_snapshot(answer(reqs[2]), pc.entries[tuple(answer(reqs[2]))])
    assert [len(k) for k in pc.entries] == [50, 54] and pc.nbytes == pc.max_bytes


def test_two_rows_restored_from_one_snapshot_grow_without_overwriting_each_other(model):
    """In-place growth: the first row to grow takes the shared buffer along (the snapshot follows it); the
    second row, sharing it too, copies on its first write. Both continue exactly as if alone."""
    x = ids(20, 4)
    a, b = ids(10, 5), ids(10, 6)
    base = model.make_cache(batch_size=1)
    prefill(model, base, x)
    snap = base.snapshot()
    del base
    first, second = model.make_cache(batch_size=1), model.make_cache(batch_size=1)
    first.restore(snap)
    first.reserve(300)
    assert first.rows[0].kv[0] is snap.rows[0].kv[0] and snap.rows[0].kv[0].capacity == 512
    second.restore(snap)
    second.reserve(300)
    with torch.no_grad():
        out_a = model(torch.tensor([a]), cache=first)
        out_b = model(torch.tensor([b]), cache=second)
    assert second.rows[0].kv[0] is not first.rows[0].kv[0]
    for tail, out in ((a, out_a), (b, out_b)):
        ref = model.make_cache(batch_size=1)
        prefill(model, ref, x)
        with torch.no_grad():
            assert torch.equal(model(torch.tensor([tail]), cache=ref), out)


def test_answers_outlive_the_snapshots_they_supersede(model):
    """Two conversations taking turns: a request's answer demotes what it restored from, its turn boundary
    and its prompt's end to the oldest end, so a cap that holds two answers keeps both conversations'."""
    per_token, state, _ = sizes(model)
    params = SamplingParams(temperature=0, max_tokens=5, stop_token_ids=(-1,))
    eng = Engine(model, prompt_cache_bytes=2**40, thread=False)
    one, two = ids(30, 7), ids(30, 8)
    r1, r2 = Request(one, params, boundary=25), Request(two, params, boundary=25)
    run(eng, r1, r2)
    one2 = answer(r1) + ids(6, 9)
    r3 = Request(one2, params, boundary=len(one2) - 2)
    run(eng, r3)
    pc = eng.prompt_cache
    assert r3.cached_tokens == 34  # conversation one's first answer
    assert len(pc.entries) == 9 and pc.demoted == {tuple(k) for k in (one[:25], one, two[:25], two, answer(r1),
                                                                       one2[:-2], one2)}
    # room for the two conversations' buffers (answers of 44 and 34 tokens) and two states
    pc.max_bytes = (44 + 34) * per_token + 2 * state
    pc.store_snapshot(answer(r3), pc.entries[tuple(answer(r3))])
    assert list(pc.entries) == [tuple(answer(r2)), tuple(answer(r3))]


def test_a_client_that_drops_answers_keeps_its_turn_boundaries(model):
    """A client whose next prompt continues the turn boundary but not the answer (thinking on, answers sent
    back without their reasoning: the template renders them otherwise than generated) never restores an
    answer. Once the cache sees that, the request's answer is evicted first and its turn boundary stays with
    the other conversation's answer (before, the boundary was evicted first: with thinking on and four users,
    0-4% of turns 2-5 reused under caps that gave 60-65% after, of 66% possible)."""
    per_token, state, _ = sizes(model)
    params = SamplingParams(temperature=0, max_tokens=5, stop_token_ids=(-1,))
    eng = Engine(model, prompt_cache_bytes=2**40, thread=False)
    pc = eng.prompt_cache
    one, two = ids(30, 7), ids(30, 8)
    r1, r2 = Request(one, params, boundary=25), Request(two, params, boundary=25)
    run(eng, r1, r2)
    assert not (r1.drops_answers or r2.drops_answers)
    assert pc.answers == {tuple(one[:25]): tuple(answer(r1)[25:]), tuple(two[:25]): tuple(answer(r2)[25:])}
    r2b = Request(answer(r2) + ids(6, 10), params, boundary=len(answer(r2)) + 4)  # this one sends it back
    one2 = one[:25] + ids(12, 9)  # turn 1's answer comes back otherwise than generated
    r3 = Request(one2, params, boundary=len(one2) - 2)
    run(eng, r2b, r3)
    assert r2b.cached_tokens == 34 and not r2b.drops_answers
    assert r3.cached_tokens == 25 and r3.drops_answers
    b3 = tuple(one2[:-2])
    assert b3 not in pc.demoted and {tuple(answer(r3)), tuple(one2)} <= pc.demoted
    # room for conversation one's boundary (35 tokens of its own buffer) and two's latest answer
    pc.max_bytes = (35 + len(answer(r2b))) * per_token + 2 * state
    pc.store_snapshot(answer(r2b), pc.entries[tuple(answer(r2b))])
    assert list(pc.entries) == [b3, tuple(answer(r2b))]
    r4 = Request(one2[:-2] + ids(8, 11), params, boundary=len(one2) + 4)
    run(eng, r4)
    assert r4.cached_tokens == len(b3) and r4.drops_answers
    # what the cache knows of answers goes with them
    assert set(pc.answers) <= {k for k in pc.entries} | {k[:n] for k, n in pc.answered.items()}


def test_the_same_prompt_again_is_no_sign_of_a_client_dropping_answers(model):
    """A prompt that stops inside an answer (the same question sent again, by another user or a retry) does
    not mark the request: only a prompt that goes another way than the answer does."""
    params = SamplingParams(temperature=0, max_tokens=5, stop_token_ids=(-1,))
    eng = Engine(model, prompt_cache_bytes=2**40, thread=False)
    one = ids(30, 7)
    r1 = Request(one, params, boundary=25)
    run(eng, r1)
    pc = eng.prompt_cache
    assert not pc.drops_answers(one) and not pc.drops_answers(answer(r1)[:-1])
    assert not pc.drops_answers(answer(r1) + ids(3, 1)) and pc.drops_answers(one + ids(3, 1))
