"""Structured output, tool_choice "required" and thinking budgets through the HTTP API, on a random-weight
model with the real Qwen3.5 tokenizer, driven with the official `openai` client (in-process server)."""

import json

import httpx
import jsonschema
import pytest
import torch
from inprocess import serving
from openai import BadRequestError, OpenAI
from test_server import ScriptedSampler

import qwen35

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "sizes", "kind"], "properties": {
    "name": {"type": "string", "maxLength": 8},
    "sizes": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 50}, "maxItems": 3},
    "kind": {"enum": ["cat", "dog"]},
    "where": {"type": "object", "additionalProperties": False, "required": ["x"],
              "properties": {"x": {"type": "number", "minimum": 0, "maximum": 1}}}}}
RF = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                           "parameters": {"type": "object", "required": ["city"], "properties": {
                                               "city": {"type": "string", "maxLength": 10},
                                               "days": {"type": "integer", "minimum": 1, "maximum": 5}}}}},
         {"type": "function", "function": {"name": "search", "parameters": {
             "type": "object", "required": ["q", "top"], "properties": {
                 "q": {"type": "string", "maxLength": 10}, "top": {"enum": ["a", "b"]}}}}}]
MSGS = [{"role": "user", "content": "Answer, please."}]


@pytest.fixture(scope="module")
def local(chat_model_dir):
    return qwen35.load(chat_model_dir, dtype=torch.float32)


@pytest.fixture()
def serve(local, monkeypatch):
    from contextlib import ExitStack

    from qwen35 import generation
    from qwen35.server.app import create_app
    from qwen35.server.engine import Engine

    with ExitStack() as stack:
        def start(scripted=None):
            if scripted is not None:
                monkeypatch.setattr(generation, "Sampler", ScriptedSampler)
                ScriptedSampler.script = scripted
            model, tok = local
            eng = Engine(model, max_batch=4, max_queue=8)
            return stack.enter_context(serving(create_app(eng, tok, "model", default_thinking=False), eng))

        yield start


def test_response_format_json_schema_batched_rows_each_validate(serve):
    from concurrent.futures import ThreadPoolExecutor

    base = serve()
    c = OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)

    def ask(seed):  # four at once: rows of one batch, each with its own grammar state
        return c.chat.completions.create(model="model", messages=MSGS, response_format=RF, max_tokens=150,
                                         temperature=1.0, seed=seed)

    with ThreadPoolExecutor(4) as pool:
        rs = list(pool.map(ask, range(4)))
    for r in rs:
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    # json_object, and the completions endpoint (raw prompt, answer constrained from its first token)
    r = c.chat.completions.create(model="model", messages=MSGS, response_format={"type": "json_object"},
                                  max_tokens=150, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].message.content.startswith("{")
    r = c.completions.create(model="model", prompt="Data:", max_tokens=150, temperature=1.0, seed=5,
                             extra_body={"response_format": RF})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)
    r = c.completions.create(model="model", prompt="Code:", max_tokens=20, temperature=1.0, seed=5,
                             extra_body={"structured_outputs": {"regex": "[A-Z]{2}-[0-9]{3}"}})
    assert r.choices[0].finish_reason == "stop" and __import__("re").fullmatch("[A-Z]{2}-[0-9]{3}", r.choices[0].text)


def test_thinking_on_reasoning_free_content_validates_and_the_cut_is_reported(serve):
    base = serve()
    body = {"model": "model", "messages": MSGS, "response_format": RF, "max_tokens": 200, "temperature": 1.0,
            "seed": 4, "max_thinking_tokens": 10, "chat_template_kwargs": {"enable_thinking": True}}
    r = httpx.post(base + "/v1/chat/completions", json=body, timeout=120).json()
    choice = r["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["reasoning_cut"] == "budget"
    assert choice["message"]["reasoning_content"]
    jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)
    # streamed: the cut arrives on the final chunk
    c = OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
    chunks = list(c.chat.completions.create(model="model", messages=MSGS, response_format=RF, max_tokens=200,
                                            temperature=1.0, seed=4, stream=True, reasoning_effort="low",
                                            extra_body={"max_thinking_tokens": 10}))
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert content == choice["message"]["content"]
    assert chunks[-1].choices[0].model_extra.get("reasoning_cut") == "budget"


def test_tool_choice_required_streams_a_schema_valid_call(serve):
    base = serve()
    c = OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
    for seed, choice in [(0, "required"), (1, "required"), (2, {"type": "function", "function": {"name": "search"}})]:
        chunks = list(c.chat.completions.create(model="model", messages=MSGS, tools=TOOLS, tool_choice=choice,
                                                max_tokens=150, temperature=1.0, seed=seed, stream=True))
        deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
        finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        assert finish == ["tool_calls"], deltas
        by_index = {}
        for d in deltas:
            entry = by_index.setdefault(d.index, {"name": None, "args": ""})
            entry["name"] = entry["name"] or d.function.name
            entry["args"] += d.function.arguments or ""
        assert by_index
        for entry in by_index.values():
            tool = next(t["function"] for t in TOOLS if t["function"]["name"] == entry["name"])
            jsonschema.validate(json.loads(entry["args"]), tool["parameters"])
            if isinstance(choice, dict):
                assert entry["name"] == "search"


def test_a_reasoning_loop_is_cut_and_an_answer_follows(serve, local):
    from qwen35.guide import LOOP_MIN_TOKENS

    _, tok = local
    span = tok.encode(" I should think about this again.")
    loop = span * 12
    answer = tok.encode("Done.") + [tok.token_to_id("<|im_end|>")]
    base = serve(scripted=loop + answer)
    body = {"model": "model", "messages": MSGS, "max_tokens": 400, "break_thinking_loops": True,
            "chat_template_kwargs": {"enable_thinking": True}}
    r = httpx.post(base + "/v1/chat/completions", json=body, timeout=120).json()
    choice = r["choices"][0]
    assert choice["reasoning_cut"] == "loop" and choice["finish_reason"] == "stop"
    # cut as soon as the repeats cover LOOP_MIN_TOKENS tokens; </think> and the template's newlines are
    # inserted (the sampler is skipped for them), and the script's tokens then make the answer
    assert choice["message"]["reasoning_content"] == tok.decode(loop[:LOOP_MIN_TOKENS]).strip()
    assert choice["message"]["content"] == (tok.decode(loop[LOOP_MIN_TOKENS:]) + "Done.").strip()
    assert r["usage"]["completion_tokens"] == len(loop) + len(answer) + 2


@pytest.mark.parametrize("body, param, message", [
    ({"response_format": {"type": "xml"}}, "response_format", "must be text, json_object or json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "strnig"}}}},
     "response_format", "strnig"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs",
     "both constrain"),
    ({"structured_outputs": {"lark": "x"}}, "structured_outputs", "must be"),
    ({"structured_outputs": {"grammar": "start: foo"}}, "structured_outputs", "unknown name"),
    ({"response_format": {"type": "json_object"}, "stop": ["}"]}, "stop", "cannot be combined"),
    # a complete answer allows only an end token: with ignore_eos it had been written out as text to max_tokens
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos", "cannot be combined"),
    # llguidance accepts it, then its lexer gives up: the answer had ended empty with finish_reason "stop"
    ({"structured_outputs": {"regex": "((a{100}){100}){100}"}}, None, "constraint failed during generation"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "both constrain"),
    ({"max_thinking_tokens": -1}, "max_thinking_tokens", "at least 0"),
    ({"break_thinking_loops": "yes"}, "break_thinking_loops", "true or false"),
])
def test_bad_structured_requests_are_400s_naming_the_parameter(serve, body, param, message):
    base = serve()
    c = OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
    with pytest.raises(BadRequestError) as e:
        c.chat.completions.create(model="model", messages=MSGS, max_tokens=5, extra_body=body)
    assert e.value.body["param"] == param and message in e.value.body["message"], e.value.body
