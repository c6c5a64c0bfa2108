"""Constrained decoding on a random-weight model with the real Qwen3.5 tokenizer: every constrained answer
parses and validates (jsonschema), the reasoning before </think> is the model's own, the first answer token is
constrained with thinking off, and a cut answer says "length"."""

import json

import jsonschema
import pytest
import torch

import qwen35
from qwen35.constrain import GrammarError, Structured, engine_for, tool_call_lark
from qwen35.errors import Qwen35Error
from qwen35.generation import Stream
from qwen35.sampling import Sampler, SamplingParams

SCHEMAS = {
    "nested": {"type": "object", "additionalProperties": False, "required": ["user", "ok"], "properties": {
        "user": {"type": "object", "additionalProperties": False, "required": ["name", "age"], "properties": {
            "name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0, "maximum": 120}}},
        "ok": {"type": "boolean"}}},
    "arrays_enums": {"type": "object", "additionalProperties": False, "required": ["tags", "mode"], "properties": {
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
        "mode": {"enum": ["fast", "slow"]}}},
    "numbers": {"type": "object", "additionalProperties": False, "required": ["x", "n"], "properties": {
        "x": {"type": "number", "minimum": -10, "maximum": 10}, "n": {"type": "integer", "minimum": 1, "maximum": 9}}},
    "array_of_objects": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
        "type": "object", "additionalProperties": False, "required": ["id", "label"], "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 99}, "label": {"type": "string", "maxLength": 4}}}},
}


@pytest.fixture(scope="module")
def chat(chat_model_dir):
    return qwen35.load(chat_model_dir)


def prompt(tok, thinking: bool) -> str:
    return tok.chat_template.render([{"role": "user", "content": "Give me the data."}], add_generation_prompt=True,
                                    enable_thinking=thinking)


def run(model, tok, text, **kw):
    rs = list(qwen35.stream_generate(model, tok, text, SamplingParams(**kw)))
    return rs, "".join(r.text for r in rs)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_constrained_answer_validates(chat, name, temperature):
    model, tok = chat
    schema = SCHEMAS[name]
    rs, text = run(model, tok, prompt(tok, False), temperature=temperature, seed=3, max_tokens=160,
                   structured=Structured.json_schema(schema))
    assert rs[-1].finish_reason == "stop", text
    jsonschema.validate(json.loads(text), schema)


def test_first_answer_token_is_constrained_with_thinking_off(chat):
    model, tok = chat
    free, _ = run(model, tok, prompt(tok, False), temperature=0, max_tokens=1)
    rs, _ = run(model, tok, prompt(tok, False), temperature=0, max_tokens=1,
                structured=Structured.json_schema(SCHEMAS["nested"]))
    assert not tok.decode([free[0].token]).startswith("{")  # so the constraint is what made it '{'
    assert tok.decode([rs[0].token]).startswith("{")


def test_reasoning_is_free_and_the_answer_validates(chat):
    model, tok = chat
    think_close = tok.token_to_id("</think>")
    free, _ = run(model, tok, prompt(tok, True), temperature=0, max_tokens=12)
    rs, text = run(model, tok, prompt(tok, True), temperature=0, max_tokens=200, max_thinking_tokens=12,
                   structured=Structured.json_schema(SCHEMAS["arrays_enums"]))
    ids = [r.token for r in rs]
    assert ids[:12] == [r.token for r in free]  # the reasoning is exactly what the model writes unconstrained
    assert ids[12:14] == [think_close] + tok.encode("\n\n") and rs[12].reasoning_cut == "budget"
    assert rs[-1].finish_reason == "stop"
    answer = text.split("</think>", 1)[1]
    assert answer.startswith("\n\n")
    jsonschema.validate(json.loads(answer), SCHEMAS["arrays_enums"])


def test_a_cut_constrained_answer_says_length(chat):
    model, tok = chat
    rs, text = run(model, tok, prompt(tok, False), temperature=0, max_tokens=3,
                   structured=Structured.json_schema(SCHEMAS["nested"]))
    assert rs[-1].finish_reason == "length" and text.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    # thinking on, no budget: the random model never closes its reasoning, and no end of turn may come
    # before the answer: the request runs to max_tokens and says "length"
    rs, text = run(model, tok, prompt(tok, True), temperature=1.0, seed=0, max_tokens=40,
                   structured=Structured.json_object())
    assert rs[-1].finish_reason == "length" and len(rs) == 40


def test_regex_and_lark_grammar(chat):
    model, tok = chat
    rs, text = run(model, tok, prompt(tok, False), temperature=1.0, seed=1, max_tokens=40,
                   structured=Structured.regex(r"[0-9]{3}-[a-z]{2,4}"))
    assert rs[-1].finish_reason == "stop"
    assert __import__("re").fullmatch(r"[0-9]{3}-[a-z]{2,4}", text), text
    rs, text = run(model, tok, prompt(tok, False), temperature=1.0, seed=2, max_tokens=40,
                   structured=Structured.grammar('start: "yes" | "no" | "maybe " NUM\nNUM: /[0-9]/'))
    assert rs[-1].finish_reason == "stop" and text in {"yes", "no"} | {f"maybe {i}" for i in range(10)}, text


def test_tool_call_grammar_gives_schema_valid_calls(chat):
    from qwen35.toolcalls import parse_output

    model, tok = chat
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "required": ["city", "days"], "properties": {
            "city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "minimum": 1, "maximum": 7},
            "unit": {"enum": ["c", "f"]}}}}},
              {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}}}]
    for seed in range(3):
        rs, text = run(model, tok, prompt(tok, False), temperature=1.0, seed=seed, max_tokens=120,
                       structured=Structured.tool_calls(tools))
        assert rs[-1].finish_reason == "stop", text
        parsed = parse_output(text, tools)
        assert parsed.tool_calls and not parsed.errors and not parsed.content.strip(), text
        for call in parsed.tool_calls:
            schema = next(t["function"]["parameters"] for t in tools if t["function"]["name"] == call.name)
            jsonschema.validate(call.arguments, schema)


def test_matcher_rollback_and_mask(chat):
    _, tok = chat
    g = engine_for(tok, 248320).compile(Structured.json_schema(SCHEMAS["nested"]))
    m = g.matcher()
    first = m.allowed().clone()
    assert first.sum() > 0 and not first[tok.token_to_id("<|im_end|>")]
    assert all(tok.decode([i]).lstrip().startswith("{") for i in first.nonzero().flatten().tolist()[:50])
    ids = tok.encode('{"user": {"name": "ab"')
    for t in ids:
        m.advance(t)
    after = m.allowed().clone()
    m.rollback(len(ids))
    assert torch.equal(m.allowed(), first)
    for t in ids:
        m.advance(t)
    assert torch.equal(m.allowed(), after)
    with pytest.raises(GrammarError, match="does not fit the grammar"):
        m.advance(tok.encode("]")[0])


def test_tool_call_grammar_accepts_the_format_and_refuses_a_missing_required_parameter(chat):
    _, tok = chat
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "required": ["a"], "properties": {"a": {"type": "string"}, "b": {"type": "array"}}}}}]
    g = engine_for(tok, 248320).compile(Structured.tool_calls(tools))
    good = "<tool_call>\n<function=f>\n<parameter=a>\nx > 1\n</parameter>\n<parameter=b>\n[1, 2]\n</parameter>\n" \
           "</function>\n</tool_call>"
    m = g.matcher()
    for t in tok.encode(good):
        m.advance(t)
    assert m.accepting
    m = g.matcher()
    with pytest.raises(GrammarError):
        for t in tok.encode("<tool_call>\n<function=f>\n<parameter=b>\n"):
            m.advance(t)
    assert "p0_0: /" in tool_call_lark(tools, tok)


def test_tool_parameters_may_refer_to_their_definitions(chat):
    """A parameter's local $ref into the parameters' $defs (or definitions) resolves in the grammar, and the
    value comes back typed by the definition."""
    from qwen35.toolcalls import parse_output

    _, tok = chat
    for where in ("$defs", "definitions"):
        params = {"type": "object", "required": ["u", "n"], where: {"Unit": {"enum": ["c", "f"]},
                                                                    "N": {"anyOf": [{"type": "integer"},
                                                                                    {"type": "boolean"}]}},
                  "properties": {"u": {"$ref": f"#/{where}/Unit"}, "n": {"$ref": f"#/{where}/N"}}}
        tools = [{"type": "function", "function": {"name": "f", "parameters": params}}]
        g = engine_for(tok, 248320).compile(Structured.tool_calls(tools))
        for value, n in (('"c"', "true"), ('"f"', "3")):
            call = f"<tool_call>\n<function=f>\n<parameter=u>\n{value}\n</parameter>\n<parameter=n>\n{n}\n" \
                   "</parameter>\n</function>\n</tool_call>"
            m = g.matcher()
            for t in tok.encode(call):
                m.advance(t)
            assert m.accepting
            (got,) = parse_output(call, tools).tool_calls
            assert got.arguments == {"u": json.loads(value), "n": json.loads(n)}
            jsonschema.validate(got.arguments, params)
        m = g.matcher()
        with pytest.raises(GrammarError):  # outside the definition
            for t in tok.encode("<tool_call>\n<function=f>\n<parameter=u>\n\"k\"\n"):
                m.advance(t)


def test_a_constraint_that_admits_no_text_is_refused(chat):
    _, tok = chat
    with pytest.raises(GrammarError, match="the regex constraint admits no text at all"):
        engine_for(tok, 248320).compile(Structured.regex("[^\\x00-\\U0010FFFF]"))
    engine_for(tok, 248320).compile(Structured.regex("(a|)"))  # the empty answer is an answer


@pytest.mark.parametrize("spec, message", [
    (lambda: Structured.json_schema({"type": "object", "properties": {"a": {"type": "strnig"}}}), "strnig"),
    (lambda: Structured.grammar("start: foo"), "unknown name"),
    (lambda: Structured.regex("(unclosed"), "regex"),
    (lambda: Structured.tool_calls([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "required": ["z"], "properties": {}}}}]), "required parameter 'z'"),
])
def test_bad_constraints_are_clear_errors(chat, spec, message):
    _, tok = chat
    with pytest.raises(GrammarError, match=message):
        engine_for(tok, 248320).compile(spec())


def test_structured_spec_and_params_are_checked():
    with pytest.raises(GrammarError, match="not one of"):
        Structured("xml")
    with pytest.raises(GrammarError, match="must be an object"):
        Structured("json_schema", "[1]")
    with pytest.raises(qwen35.SamplingError, match="ignore_eos"):
        SamplingParams(structured=Structured.json_object(), ignore_eos=True)
    with pytest.raises(qwen35.SamplingError, match="max_thinking_tokens"):
        SamplingParams(max_thinking_tokens=-1)
    assert SamplingParams(structured=Structured.json_object()).constrained
    assert SamplingParams(max_thinking_tokens=5).constrained and SamplingParams(break_thinking_loops=True).constrained
    assert not SamplingParams().constrained


def test_token_level_stream_refuses_constrained_params_without_a_guide():
    params = SamplingParams(structured=Structured.json_object())
    with pytest.raises(Qwen35Error, match="needs the tokenizer"):
        Stream(params, Sampler(params, 10))


DEEP = r'''
import json, sys
import numpy as np
from qwen35.commands.common import default_model
from qwen35.constrain import Structured, engine_for
from qwen35.tokenizer import Tokenizer

tok = Tokenizer(default_model())
eng = engine_for(tok, 8192)
n = 1000
chain = {f"d{i}": {"type": "object", "additionalProperties": False, "required": ["a"],
                   "properties": {"a": {"$ref": f"#/$defs/d{i + 1}"}}} for i in range(n)}
chain[f"d{n}"] = {"type": "integer"}
rules = "start: r0\n" + "".join(f'r{i}: "a" r{i + 1}\n' for i in range(5000)) + 'r5000: "b"\n'
for spec in (Structured.json_schema({"$defs": chain, "$ref": "#/$defs/d0"}), Structured.grammar(rules)):
    m = eng.compile(spec).matcher()  # the row's state, used on this (main) thread as a decode thread uses it
    for _ in range(3):
        m.advance(int(np.flatnonzero(m.allowed().numpy())[0]))
    print(spec.kind, "ok")
'''


def test_a_deeply_chained_grammar_compiles_without_overflowing_the_stack():
    """llguidance compiles recursively: a 1000-link $ref chain (125 KB, JSON nesting 7) or 5000 chained Lark rules
    overflowed the 8 MiB stack of the thread compiling it, a SIGSEGV that killed `qwen35 serve` on one request.
    Compiling runs on a 256 MiB stack and rows copy the start state (no compile on the decode thread). In a
    child process, so a crash fails this test rather than the whole run."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", DEEP], capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split("\n")[:2] == ["json_schema ok", "grammar ok"]


def test_a_constraint_that_fails_mid_answer_is_an_error_not_an_empty_answer(chat):
    """A regex llguidance accepts but whose lexer gives up ("too many expressions constructed"): its mask held
    only the end tokens, so the answer ended empty with finish_reason "stop"; it is a GrammarError now."""
    model, tok = chat
    g = engine_for(tok, model.config.vocab_size)
    try:
        m = g.compile(Structured.regex("((a{100}){100}){100}")).matcher()
        m.fill_mask()
        m.fill_mask()
    except GrammarError as e:
        assert "too many expressions" in str(e) and "\n" not in str(e)
    else:
        pytest.fail("the lexer's failure was not reported")
