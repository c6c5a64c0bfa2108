"""The serving engine's scheduling: prompts fed a chunk per turn between decode steps (a short prompt is
not stuck behind a long one), cancellation within one chunk, and admission by memory (engine.py,
server/prefill.py). The worker's turns are driven by hand (`_turn_once`), so each assertion is about a
definite turn, not about timing."""

from __future__ import annotations

import httpx
import pytest
import torch

import qwen35
from qwen35.sampling import SamplingParams
from qwen35.server.engine import Engine, MemoryBudgetExceeded, Request


@pytest.fixture(scope="module")
def model(chat_model_dir):
    return qwen35.load(chat_model_dir, dtype=torch.float32)[0]


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(10, 4000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, stop_token_ids=(-1,))


def alone(model, ids, n):
    return [s.token for s in qwen35.generate_step(model, ids, params=greedy(n))]


def tokens(req: Request) -> list[int]:
    return [t.token for t in req.out.queue if t.token is not None]


def finish(eng: Engine, limit: int = 500) -> None:
    with torch.inference_mode():
        for _ in range(limit):
            if not (eng.active or eng.feeding or eng.waiting):
                return
            eng._turn_once()
    raise AssertionError("the engine did not finish its requests")


def test_a_short_prompt_gets_its_first_token_during_a_long_prefill(model):
    eng = Engine(model, max_batch=4, prompt_cache_bytes=0, prefill_chunk_size=32, thread=False)
    long, short = prompt(300, 1), prompt(5, 2)
    long_req, short_req = Request(long, greedy(6)), Request(short, greedy(6))
    with torch.inference_mode():
        eng.submit(long_req)
        eng._turn_once()  # the long prompt's first chunk
        eng.submit(short_req)
        turns = 0
        while not tokens(short_req):
            eng._turn_once()
            turns += 1
        assert turns == 1  # admitted, and its prompt fed on the next prefill turn (round robin)
        assert [f.req for f in eng.feeding] == [long_req] and eng.feeding[0].pos == 32  # 1 of 10 chunks fed
        while not tokens(long_req):
            eng._turn_once()
    # the short request decoded between the long one's chunks: it finished before the long one started
    assert len(tokens(short_req)) == 6
    finish(eng)
    assert tokens(long_req) == alone(model, long, 6) and tokens(short_req) == alone(model, short, 6)
    assert eng.reserved_bytes == 0


def test_a_cancelled_prefill_stops_within_one_chunk(model):
    eng = Engine(model, max_batch=4, prompt_cache_bytes=0, prefill_chunk_size=32, thread=False)
    req = eng.submit(Request(prompt(300, 3), greedy(4)))
    with torch.inference_mode():
        eng._turn_once()
        eng._turn_once()
        job = eng.feeding[0]
        assert job.pos == 64 and eng.reserved_bytes > 0
        req.cancel()
        eng._turn_once()
    assert job.pos == 64 and not eng.feeding and not eng.active  # no chunk fed after the cancel
    assert [(t.token, t.finish_reason) for t in req.out.queue] == [(None, "cancelled")]
    assert eng.reserved_bytes == 0
    # the engine goes on serving
    nxt = eng.submit(Request(prompt(20, 4), greedy(3)))
    finish(eng)
    assert tokens(nxt) == alone(model, prompt(20, 4), 3)


def test_the_memory_budget_is_what_a_row_allocates(model):
    eng = Engine(model, max_batch=4, prompt_cache_bytes=0, prefill_chunk_size=32, thread=False)
    req = eng.submit(Request(prompt(40, 5), greedy(300)))  # 340 tokens: two KV growth steps
    with torch.inference_mode():
        eng._turn_once()
    job = eng.feeding[0]
    assert job.cache.allocated_bytes == req.reserved_bytes == eng.reserved_bytes
    assert req.reserved_bytes == eng.request_bytes(40, 300) > eng.request_bytes(40, 200)  # 512 vs 256 slots
    finish(eng)
    assert eng.reserved_bytes == 0


def test_requests_wait_for_memory_and_too_big_ones_are_refused(model):
    one = Engine(model, thread=False).request_bytes(30, 8)
    eng = Engine(model, max_batch=4, prompt_cache_bytes=0, thread=False, memory_budget=int(one * 1.5))
    a, b = Request(prompt(30, 6), greedy(8)), Request(prompt(30, 7), greedy(8))
    eng.submit(a)
    eng.submit(b)
    with torch.inference_mode():
        eng._turn_once()
    assert [f.req for f in eng.feeding] + [r for r, _ in eng.active] == [a] and list(eng.waiting) == [b]
    assert eng.reserved_bytes == one
    finish(eng)
    assert tokens(a) == alone(model, prompt(30, 6), 8) and tokens(b) == alone(model, prompt(30, 7), 8)
    assert eng.reserved_bytes == 0
    with pytest.raises(MemoryBudgetExceeded, match=r"needs .* \(prompt of 30 tokens \+ max_tokens 2000\) but the "
                                                   r"server's memory budget is .*; lower max_tokens"):
        eng.submit(Request(prompt(30, 8), greedy(2000)))
    assert not eng.waiting


def test_http_400_names_the_memory_budget_and_the_server_goes_on(chat_model_dir):
    """A request that could never fit is a 400 (a 503 is retried by clients, forever)."""
    from inprocess import serving

    from qwen35.server.app import create_app

    model, tok = qwen35.load(chat_model_dir, dtype=torch.float32)
    budget = Engine(model, thread=False).request_bytes(64, 64)
    eng = Engine(model, max_batch=2, memory_budget=budget)
    with serving(create_app(eng, tok, "model", default_thinking=False), eng) as base:
        msgs = [{"role": "user", "content": "Hello"}]
        r = httpx.post(base + "/v1/chat/completions", json={"model": "model", "messages": msgs, "max_tokens": 5000})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["code"] == "insufficient_memory" and "memory budget" in err["message"]
        assert "--memory-budget" in err["message"]
        assert "max_tokens 5000" in err["message"] and "Traceback" not in r.text
        r = httpx.post(base + "/v1/chat/completions",
                       json={"model": "model", "messages": msgs, "max_tokens": 4, "temperature": 0}, timeout=60)
        assert r.status_code == 200
        ids = tok.encode(tok.chat_template.render(msgs, enable_thinking=False))
        assert r.json()["choices"][0]["message"]["content"] == tok.decode(alone(model, ids, 4))
        metrics = httpx.get(base + "/metrics").text
        assert f"qwen35_memory_budget_bytes {budget}" in metrics and "qwen35_memory_reserved_bytes 0" in metrics
