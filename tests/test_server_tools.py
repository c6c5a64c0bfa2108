# ruff: noqa: F811 - the fixtures imported from test_server are parameters of the tests here
"""Tool calls through /v1/chat/completions: what a stream's chunks add up to is the answer in one body
(content, reasoning, calls, errors, finish reason), a call cut off included, on a scripted model."""

import json

import httpx
import pytest
from test_server import TOOLS, inprocess, local  # noqa: F401 - fixtures

USER = [{"role": "user", "content": "Weather in Paris?"}]
CALL = ("<tool_call>\n<function=get_weather>\n<parameter=city>\n{}\n</parameter>\n<parameter=days>\n2\n</parameter>\n"
        "</function>\n</tool_call>")
OUT = "I will check.\n\n" + CALL.format("Paris")


def one_body(base: str, body: dict) -> tuple[dict, str]:
    r = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    m = choice["message"]
    calls = [{"id": c["id"], "type": c["type"], "name": c["function"]["name"], "arguments": c["function"]["arguments"]}
             for c in m.get("tool_calls", [])]
    return {"content": m["content"] or "", "reasoning_content": m.get("reasoning_content", ""), "tool_calls": calls,
            "tool_call_errors": m.get("tool_call_errors", [])}, choice["finish_reason"]


def streamed(base: str, body: dict) -> tuple[dict, str, list[dict]]:
    """The message a client assembles from the stream (OpenAI's rules: a call's pieces joined by index), its
    finish reason, and every tool_calls piece as sent."""
    with httpx.stream("POST", base + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    msg = {"content": "", "reasoning_content": "", "tool_calls": [], "tool_call_errors": []}
    finish, pieces = None, []
    for ev in events:
        for ch in ev.get("choices", []):
            d = ch["delta"]
            msg["content"] += d.get("content") or ""
            msg["reasoning_content"] += d.get("reasoning_content") or ""
            msg["tool_call_errors"] += d.get("tool_call_errors") or []
            for tc in d.get("tool_calls") or []:
                pieces.append(tc)
                while len(msg["tool_calls"]) <= tc["index"]:
                    msg["tool_calls"].append({"id": None, "type": None, "name": "", "arguments": ""})
                slot = msg["tool_calls"][tc["index"]]
                slot["id"], slot["type"] = tc.get("id") or slot["id"], tc.get("type") or slot["type"]
                slot["name"] += tc["function"].get("name") or ""
                slot["arguments"] += tc["function"].get("arguments") or ""
            finish = ch.get("finish_reason") or finish
    return msg, finish, pieces


def without_ids(msg: dict) -> dict:
    # two requests, two sets of call ids
    return {**msg, "tool_calls": [{k: v for k, v in c.items() if k != "id"} for c in msg["tool_calls"]]}


@pytest.mark.parametrize("cut", ["max_tokens", "stop"])
def test_a_call_cut_off_is_never_announced_in_a_stream(inprocess, local, cut):
    """A call cut off by max_tokens or a stop string: the answer in one body has no call (its text is content,
    with an error); the stream says the same and never announces the call it would drop."""
    _, tok = local
    ids = tok.encode(OUT)
    extra = {"max_tokens": len(ids) - 8} if cut == "max_tokens" else {"stop": ["<parameter=days>"], "max_tokens": 200}
    base, _ = inprocess(scripted=ids + [tok.token_to_id("<|im_end|>")])
    body = {"messages": USER, "tools": TOOLS, **extra}
    whole, finish = one_body(base, body)
    text = tok.decode(ids[: len(ids) - 8]) if cut == "max_tokens" else OUT[: OUT.index("<parameter=days>")]
    assert whole == {"content": text, "reasoning_content": "", "tool_calls": [],
                     "tool_call_errors": ["tool call was not closed with </tool_call>"]}
    assert finish == ("length" if cut == "max_tokens" else "stop")
    msg, stream_finish, pieces = streamed(base, body)
    assert pieces == []
    assert (msg, stream_finish) == (whole, finish)


def test_a_streamed_call_comes_whole_once_parsed(inprocess, local):
    _, tok = local
    out = OUT + "\n" + CALL.format("Rome")
    base, _ = inprocess(scripted=tok.encode(out) + [tok.token_to_id("<|im_end|>")])
    body = {"messages": USER, "tools": TOOLS, "max_tokens": 300}
    whole, finish = one_body(base, body)
    msg, stream_finish, pieces = streamed(base, body)
    assert (without_ids(msg), stream_finish) == (without_ids(whole), finish) == (
        {"content": "I will check.", "reasoning_content": "", "tool_call_errors": [],
         "tool_calls": [{"type": "function", "name": "get_weather", "arguments": json.dumps({"city": c, "days": 2})}
                        for c in ("Paris", "Rome")]}, "tool_calls")
    # one piece per call: its id, name and complete arguments together
    assert [(p["index"], p["type"], p["function"]["name"]) for p in pieces] == [(0, "function", "get_weather"),
                                                                                 (1, "function", "get_weather")]
    assert all(p["id"].startswith("call_") for p in pieces) and pieces[0]["id"] != pieces[1]["id"]
