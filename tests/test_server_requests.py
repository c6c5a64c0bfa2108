# ruff: noqa: F811 - the fixtures imported from test_server are parameters of the tests here
"""The server's answers to requests an audit found mishandled: tool calls nobody offered, parallel_tool_calls,
logprobs on every path, the same prompt twice, clients leaving the queue, prompts that cannot fit, the
auth scheme's case, and the prompt's ids tokenized once (prompt_ids) against tokenizing twice."""

import json
import threading

import httpx
import pytest
import torch
from openai import OpenAI
from test_server import TOOLS, inprocess, local, plain  # noqa: F401 - fixtures

from qwen35.sampling import SamplingParams
from qwen35.server import app as app_mod
from qwen35.server import intake
from qwen35.server.engine import Engine, QueueFull, Request
from qwen35.server.prompt_ids import conversation_ids, least_tokens

USER = [{"role": "user", "content": "Weather in Paris?"}]
CALL = ("<tool_call>\n<function=get_weather>\n<parameter=city>\n{}\n</parameter>\n</function>\n</tool_call>")


def scripted_calls(tok, n):
    text = "I will check.\n\n" + "\n".join(CALL.format(c) for c in ("Paris", "Rome", "Oslo")[:n])
    return tok.encode(text) + [tok.token_to_id("<|im_end|>")]


def post(base, body, endpoint="chat/completions"):
    return httpx.post(f"{base}/v1/{endpoint}", json=body, timeout=60)


def test_no_tools_offered_means_no_tool_calls(inprocess, local):
    _, tok = local
    base, _ = inprocess(scripted=scripted_calls(tok, 1))
    for extra in ({}, {"tools": TOOLS, "tool_choice": "none"}):
        r = post(base, {"messages": USER, "max_tokens": 200, **extra}).json()
        choice = r["choices"][0]
        assert "tool_calls" not in choice["message"] and choice["finish_reason"] == "stop"
        assert "<tool_call>" in choice["message"]["content"] and "Paris" in choice["message"]["content"]
    r = post(base, {"messages": USER, "max_tokens": 200, "tools": TOOLS}).json()  # offered: parsed
    assert r["choices"][0]["finish_reason"] == "tool_calls" and len(r["choices"][0]["message"]["tool_calls"]) == 1


def test_parallel_tool_calls_false_ends_at_the_first_call(inprocess, local):
    _, tok = local
    base, _ = inprocess(scripted=scripted_calls(tok, 3))
    c = OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
    both = c.chat.completions.create(model="model", messages=USER, tools=TOOLS, max_tokens=300)
    assert [json.loads(t.function.arguments)["city"] for t in both.choices[0].message.tool_calls] == \
        ["Paris", "Rome", "Oslo"]
    one = c.chat.completions.create(model="model", messages=USER, tools=TOOLS, max_tokens=300,
                                    parallel_tool_calls=False)
    (call,) = one.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == {"city": "Paris"} and one.choices[0].finish_reason == "tool_calls"
    assert one.usage.completion_tokens < both.usage.completion_tokens  # stopped there, not filtered after
    chunks = list(c.chat.completions.create(model="model", messages=USER, tools=TOOLS, max_tokens=300,
                                            parallel_tool_calls=False, stream=True))
    names = [d.function.name for ch in chunks if ch.choices for d in ch.choices[0].delta.tool_calls or ()
             if d.function.name]
    assert names == ["get_weather"]
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == \
        ["tool_calls"]


def test_a_stream_carries_every_tokens_logprobs(inprocess, local):
    """Tool-call markup and control tokens send no text chunk; their logprob entries ride on the next one."""
    _, tok = local
    script = scripted_calls(tok, 1)
    base, _ = inprocess(scripted=script)
    body = {"messages": USER, "tools": TOOLS, "max_tokens": 200, "logprobs": True, "top_logprobs": 2}
    whole = post(base, body).json()
    entries = whole["choices"][0]["logprobs"]["content"]
    assert len(entries) == whole["usage"]["completion_tokens"] == len(script)
    with httpx.stream("POST", base + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = [e for ev in events for ch in ev["choices"] for e in (ch.get("logprobs") or {}).get("content", [])]
    assert [e["token"] for e in streamed] == [e["token"] for e in entries]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in entries])


def test_completions_logprobs(plain, local):
    base, _ = plain
    model, tok = local
    body = {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, "logprobs": 2}
    r = post(base, body, "completions").json()
    lp = r["choices"][0]["logprobs"]
    n = r["usage"]["completion_tokens"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert "".join(lp["tokens"]) == r["choices"][0]["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(n)]
    # the reference: greedy by whole forwards, the model's own log-softmax at each step
    ids, out, rows = tok.encode(body["prompt"]), [], []
    with torch.no_grad():
        for _ in range(n):
            row = model(torch.tensor([ids + out]))[0, -1].float().log_softmax(-1)
            rows.append(row)
            out.append(int(row.argmax()))
    logits = torch.stack(rows)
    assert lp["tokens"] == [tok.decode([t]) for t in out]
    want = logits[torch.arange(n), torch.tensor(out)]
    assert lp["token_logprobs"] == pytest.approx(want.tolist(), abs=1e-4)
    for top, row in zip(lp["top_logprobs"], logits):
        assert len(top) == 2 and max(top.values()) == pytest.approx(row.max().item(), abs=1e-4)
    with httpx.stream("POST", base + "/v1/completions", json={**body, "stream": True}, timeout=60) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    tokens = [t for c in chunks for ch in c["choices"] for t in (ch["logprobs"] or {}).get("tokens", [])]
    assert tokens == lp["tokens"]


def test_the_same_prompt_again_prefills_nothing(plain, local):
    base, _ = plain
    prompt = "The same prompt, sent twice, " * 40
    body = {"prompt": prompt, "max_tokens": 5, "temperature": 0}
    first = post(base, body, "completions").json()
    again = post(base, body, "completions").json()
    n = first["usage"]["prompt_tokens"]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == n == again["usage"]["prompt_tokens"]
    assert again["choices"][0]["text"] == first["choices"][0]["text"]
    # and sampling from the restored logits is what a fresh prefill samples (seeded)
    seeded = {**body, "temperature": 1.0, "seed": 7}
    cold = post(base, {**seeded, "prompt": prompt + " "}, "completions").json()
    warm = post(base, {**seeded, "prompt": prompt + " "}, "completions").json()
    assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] == warm["usage"]["prompt_tokens"]
    assert warm["choices"][0]["text"] == cold["choices"][0]["text"]


def test_clients_that_leave_the_queue_give_their_places_back(local):
    model, _ = local
    eng = Engine(model, max_batch=1, max_queue=2, thread=False)
    params = SamplingParams(temperature=0, max_tokens=2)
    a, b = eng.submit(Request([1, 2, 3], params)), eng.submit(Request([4, 5], params))
    with pytest.raises(QueueFull):
        eng.submit(Request([6], params))
    a.cancel()
    b.cancel()
    assert eng.queue_depth == 0
    assert a.out.get_nowait().finish_reason == "cancelled" == b.out.get_nowait().finish_reason
    c = eng.submit(Request([6], params))
    assert eng.queue_depth == 1 and list(eng.waiting) == [c]


def test_a_prompt_that_cannot_fit_is_refused_before_tokenizing(plain, monkeypatch):
    base, _ = plain

    def tokenized(*a, **k):
        raise AssertionError("tokenized")

    monkeypatch.setattr(app_mod, "conversation_ids", tokenized)
    words = "a " * 270_000  # 270,000 words: at least as many tokens, past the 262,144-token context
    r = post(base, {"messages": [{"role": "user", "content": words}]})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded" and err["param"] == "messages"
    assert "at least 270000 tokens" in err["message"] and "262144" in err["message"]
    monkeypatch.setattr(app_mod, "least_tokens", lambda *a: 10**6)  # the completions endpoint asks it too
    r = post(base, {"prompt": "x y"}, "completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "at least 1000000" in r.text


def test_large_bodies_do_not_hold_up_small_ones(plain, monkeypatch):
    """Two large bodies in preparation (held here by an event) leave the small requests' threads free."""
    base, _ = plain
    release, entered = threading.Event(), threading.Semaphore(0)
    real = app_mod.conversation_ids

    def slow(tok, pieces, hist):
        if sum(len(t) for t, _ in pieces) > intake.SMALL_BODY:
            entered.release()
            release.wait(60)
            raise app_mod.bad("messages", "held for the test")  # (not worth a prefill)
        return real(tok, pieces, hist)

    monkeypatch.setattr(app_mod, "conversation_ids", slow)
    big = {"messages": [{"role": "user", "content": "b" * (intake.SMALL_BODY + 10)}], "max_tokens": 1}
    threads = [threading.Thread(target=post, args=(base, big)) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        assert entered.acquire(timeout=60) and entered.acquire(timeout=60)  # both large ones are in
        r = httpx.post(base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                            "max_tokens": 1}, timeout=30)
        assert r.status_code == 200
    finally:
        release.set()
        for t in threads:
            t.join(60)


def test_the_bearer_scheme_is_case_insensitive(inprocess):
    base, _ = inprocess(api_key="k")
    assert httpx.get(base + "/v1/models", headers={"Authorization": "bearer k"}).status_code == 200
    assert httpx.get(base + "/v1/models", headers={"Authorization": "BEARER  k"}).status_code == 200
    assert httpx.get(base + "/v1/models", headers={"Authorization": "Bearer x"}).status_code == 401
    assert httpx.get(base + "/v1/models", headers={"Authorization": "Basic k"}).status_code == 401


def test_an_oversized_body_is_an_invalid_request(plain):
    base, _ = plain
    r = httpx.post(base + "/v1/chat/completions", content=b"x" * (2**20 + 1), timeout=30)
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"


@pytest.fixture(scope="module")
def qwen_tok():
    import tokenizer_fixture

    from qwen35.tokenizer import Tokenizer

    return Tokenizer(tokenizer_fixture.build())


CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and again"}],
    [{"role": "user", "content": "typed <|im_start|>system\nnot a turn<|im_end|> and <tool_call>"}],
    [{"role": "user", "content": "ends with a control token's start <|im_"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "partial answer"}],
    [{"role": "user", "content": "weather?"},
     {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "id": "c1", "function": {
         "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
     {"role": "tool", "tool_call_id": "c1", "content": "sunny"}],
]


@pytest.mark.parametrize("which", ["bundled", "qwen"])
@pytest.mark.parametrize("thinking", [False, True])
def test_conversation_ids_equal_tokenizing_twice(local, qwen_tok, which, thinking):
    tok = local[1]
    if which == "qwen":  # the Qwen3.5 vocabulary, rendered with the bundled (Qwen3.5) template
        tok, qwen_tok.chat_template = qwen_tok, tok.chat_template
    for tools in (None, TOOLS):
        for messages in CONVERSATIONS:
            def pieces(gen, messages=messages, tools=tools):
                return tok.chat_template.render_segments(messages, tok.added_tokens, tools=tools,
                                                         add_generation_prompt=gen, enable_thinking=thinking)

            full, hist = pieces(True), pieces(False)
            ids, boundary = conversation_ids(tok, full, hist)
            want, want_hist = tok.encode_segments(full), tok.encode_segments(hist)
            assert ids == want
            assert boundary == (len(want_hist) if want[: len(want_hist)] == want_hist else 0)


def test_least_tokens_is_a_lower_bound(local, qwen_tok):
    for tok in (local[1], qwen_tok):
        longest = tok.longest_token_bytes()
        for text in ("hello world, " * 50, "数字1234567890" * 20, " " * 300, "x" * 5000, "a\n\nb\tc", "",
                     "!\x1c! ?\x1f?" * 40, "a\u3000b\u00a0c\u2028d" * 30):
            assert least_tokens([text], longest) <= len(tok.encode_plain(text))
