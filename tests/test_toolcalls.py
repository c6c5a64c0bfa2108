"""Streaming output parser: reasoning, content, XML and JSON tool calls; any split equals the whole."""

import json
import random

import pytest

from qwen35.tool_schema import coerce
from qwen35.toolcalls import OutputParser, ParsedDelta, parse_output

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
    "ratio": {"type": "number"}, "opts": {"type": "object"}, "tags": {"type": "array"}}}}},
         {"type": "function", "function": {"name": "note", "parameters": {"type": "object", "properties": {
             "text": {"type": "string"}}}}}]

XML_CALL = ("<tool_call>\n<function=get_weather>\n<parameter=days>\n3\n</parameter>\n<parameter=city>\nNew York\n"
            "</parameter>\n<parameter=metric>\ntrue\n</parameter>\n<parameter=ratio>\n0.5\n</parameter>\n"
            "<parameter=opts>\n{\"unit\": \"C\"}\n</parameter>\n<parameter=tags>\n[\"a\", 1]\n</parameter>\n"
            "</function>\n</tool_call>")
STREAMS = [
    "Plain answer, no tags.",
    "Reasoning here.\n</think>\n\nThe answer.",
    "<think>\nopened by the model\n</think>\n\nAnswer.",
    "Let me check.\n\n" + XML_CALL,
    "thinking about a call\n" + XML_CALL + "\nstill thinking\n</think>\n\nDone.",
    XML_CALL + "\n<tool_call>\n{\"name\": \"note\", \"arguments\": {\"text\": \"multi\\nline\"}}\n</tool_call>",
    "<tool_call>\n<function=note>\n<parameter=text>\nline one\n\nline three <b>bold</b>\n</parameter>\n</function>\n"
    "</tool_call>",
    "never closes the think block",
    "a <tool_call>{\"name\": \"note\", \"arguments\": \"{\\\"text\\\": \\\"s\\\"}\"}</tool_call> b",
    "bad <tool_call>{oops}</tool_call> end",
    "unknown <tool_call><function=launch_rockets></function></tool_call> end",
    "unclosed <tool_call><function=note><parameter=text>hello",
    "<tool_call>\n<function=note>\n<parameter=text>\nclosed function, unclosed call\n</parameter>\n</function>\n",
    "text with < and <tool and </thi lookalikes > done",
    # tags written as prose: the call they open is no call, its text goes back (PROSE below)
    "Do I need a <tool_call> here? No.\n</think>\n\nParis.",
    "I'll reply with a <tool_call> block.\n</think>\n\nLet me check.\n\n" + XML_CALL,
    "I could use <function=note> but no need.\n</think>\n\nIt is sunny.",
    # values holding tags, two functions in one block (TAGGED_VALUES, test_one_block_may_hold_several_functions)
    "<tool_call>\n<function=note>\n<parameter=text>\nprint('</function>')\n</parameter>\n</function>\n</tool_call>",
    "<function=note>\n<parameter=text>\nprint('</function>')\n</parameter>\n</function> after",
    "<tool_call>\n<function=note>\n<parameter=text>\nA\n</parameter>\n</function>\n<function=note>\n"
    "<parameter=text>\nB\n</parameter>\n</function>\n</tool_call>",
]


def whole(s, thinking):
    return parse_output(s, TOOLS, thinking_open=thinking)


def key(d: ParsedDelta):
    return d.reasoning, d.content, [(c.name, c.arguments) for c in d.tool_calls], d.errors


@pytest.mark.parametrize("i", range(len(STREAMS)))
@pytest.mark.parametrize("thinking", [False, True])
def test_any_split_gives_the_same_result(i, thinking):
    s = STREAMS[i]
    ref = key(whole(s, thinking))
    r = random.Random(i)
    for trial in range(60):
        cuts = sorted(r.sample(range(1, len(s)), min(len(s) - 1, r.randint(1, 25)))) if len(s) > 1 else []
        p = OutputParser(TOOLS, thinking_open=thinking)
        acc = ParsedDelta()
        for a, b in zip([0] + cuts, cuts + [len(s)]):
            acc += p.feed(s[a:b])
        acc += p.finish()
        assert key(acc) == ref, (trial, cuts)
    # one character at a time
    p = OutputParser(TOOLS, thinking_open=thinking)
    acc = ParsedDelta()
    for ch in s:
        acc += p.feed(ch)
    acc += p.finish()
    assert key(acc) == ref


def test_xml_call_any_order_types_and_multiline():
    d = whole("Let me check.\n\n" + XML_CALL, False)
    assert d.content == "Let me check." and d.errors == []
    (call,) = d.tool_calls
    assert call.name == "get_weather"
    assert call.arguments == {"days": 3, "city": "New York", "metric": True, "ratio": 0.5, "opts": {"unit": "C"},
                              "tags": ["a", 1]}
    d = whole(STREAMS[6], False)
    assert d.tool_calls[0].arguments == {"text": "line one\n\nline three <b>bold</b>"}


def test_reasoning_split():
    assert key(whole(STREAMS[1], True))[:2] == ("Reasoning here.", "The answer.")
    assert key(whole(STREAMS[2], False))[:2] == ("opened by the model", "Answer.")
    assert key(whole(STREAMS[7], True))[:2] == ("never closes the think block", "")


def test_calls_inside_think_are_kept():
    d = whole(STREAMS[4], True)
    assert [c.name for c in d.tool_calls] == ["get_weather"]
    assert d.reasoning == "thinking about a call\nstill thinking" and d.content == "Done."


def test_json_form_and_several_calls():
    d = whole(STREAMS[5], False)
    assert [(c.name, c.arguments) for c in d.tool_calls][1] == ("note", {"text": "multi\nline"})
    d = whole(STREAMS[8], False)
    assert d.tool_calls[0].arguments == {"text": "s"} and d.content == "a b"


@pytest.mark.parametrize("i,error", [(9, "tool call is not valid JSON"), (10, "model called unknown function "
                                                                          "'launch_rockets'"),
                                     (11, "tool call was not closed with </tool_call>")])
def test_malformed_calls_become_content_with_an_error(i, error):
    d = whole(STREAMS[i], False)
    assert d.tool_calls == [] and d.errors and d.errors[0].startswith(error)
    assert "<tool_call>" in d.content


def test_unclosed_call_with_complete_function_is_parsed():
    d = whole(STREAMS[12], False)
    assert d.tool_calls[0].arguments == {"text": "closed function, unclosed call"}
    assert "not closed" in d.errors[0]


def test_lookalike_tags_are_plain_text():
    assert whole(STREAMS[13], False).content == STREAMS[13]


def test_coerce_keeps_text_when_type_does_not_fit():
    assert coerce("abc", {"type": "integer"}) == "abc"
    assert coerce("7", {"type": ["null", "integer"]}) == 7
    assert coerce("x", None) == "x"


@pytest.mark.parametrize("i", [3, 4, 5, 6, 8, 12])
def test_a_call_is_given_out_whole_once_its_closing_tag_is_read(i):
    s = STREAMS[i]
    r = random.Random(100 + i)
    for trial in range(40):
        cuts = sorted(r.sample(range(1, len(s)), min(len(s) - 1, r.randint(1, 40))))
        p = OutputParser(TOOLS, thinking_open=i == 4)
        acc = ParsedDelta()
        for a, b in zip([0] + cuts, cuts + [len(s)]):
            acc += p.feed(s[a:b])
            # no call before the </tool_call> that closes it has been read
            assert len(acc.tool_calls) <= s[:b].count("</tool_call>"), (trial, b)
        acc += p.finish()
        assert [(c.name, c.arguments) for c in acc.tool_calls] == key(whole(s, i == 4))[2]


def test_a_call_is_held_until_it_closes():
    p = OutputParser(TOOLS)
    head = XML_CALL[: XML_CALL.index("</tool_call>")]  # every parameter and </function> read: still no call
    d = p.feed("Checking.\n\n" + head)
    assert (d.content, d.tool_calls, d.errors) == ("Checking.", [], [])
    rest = p.feed("</tool_call>")
    (call,) = rest.tool_calls
    assert call.arguments["city"] == "New York" and json.loads(call.arguments_json()) == call.arguments


def test_a_call_cut_off_is_never_given_out():
    """A call cut off (max_tokens, a stop string) is text with an error, whole or streamed: no delta ever
    announced it, so a stream says the same as the answer in one piece."""
    text = "<tool_call><function=note><parameter=text>\nx\n</parameter>"
    d = parse_output(text, TOOLS)
    assert (d.content, d.tool_calls, d.errors) == (text, [], ["tool call was not closed with </tool_call>"])
    p, deltas = OutputParser(TOOLS), []
    for ch in text:
        deltas.append(p.feed(ch))
    deltas.append(p.finish())
    assert not any(x.tool_calls for x in deltas)
    assert "".join(x.content for x in deltas) == text


# ---- robustness: the failure shapes users report, whole and streamed token by token (real tokenizer) ----

RTOOLS = [{"type": "function", "function": {"name": "calc", "parameters": {"type": "object", "properties": {
    "x": {"type": "float"}, "n": {"type": "int"}, "opts": {"type": "dict"}, "items": {"type": "list"},
    "code": {"type": "string"}}}}},
          {"type": "function", "function": {"name": "note", "parameters": {"type": "object", "properties": {
              "text": {"type": "str"}}}}}]
CODE = "if a < b and b<c:\n    s = '</parameter>'  # a closing tag inside code\n    t = '<p>'"
ROBUST = {  # name: (text, thinking_open, [(name, arguments)], content, reasoning, error substring or None)
    "missing_close_mid": ("<tool_call>\n<function=calc>\n<parameter=x>\n1.5\n<parameter=n>\n3\n</parameter>\n"
                          "</function>\n</tool_call>", False, [("calc", {"x": 1.5, "n": 3})], "", "", None),
    "missing_close_last": ("<tool_call>\n<function=calc>\n<parameter=n>\n3\n</parameter>\n<parameter=x>\n-2\n"
                           "</function>\n</tool_call>", False, [("calc", {"n": 3, "x": -2})], "", "", None),
    "bare_function": ("Sure.\n<function=note>\n<parameter=text>\nhi there\n</parameter>\n</function>", False,
                      [("note", {"text": "hi there"})], "Sure.", "", None),
    "python_types": ("<tool_call>\n<function=calc>\n<parameter=x>\n2\n</parameter>\n<parameter=n>\n7\n</parameter>\n"
                     "<parameter=opts>\n{\"deep\": [1, {\"k\": null}]}\n</parameter>\n<parameter=items>\n[\"a\", 2.5]"
                     "\n</parameter>\n</function>\n</tool_call>", False,
                     [("calc", {"x": 2, "n": 7, "opts": {"deep": [1, {"k": None}]}, "items": ["a", 2.5]})], "", "",
                     None),
    "code_with_tags": (f"<tool_call>\n<function=calc>\n<parameter=code>\n{CODE}\n</parameter>\n</function>\n"
                       "</tool_call>", False, [("calc", {"code": CODE})], "", "", None),
    "several_calls": ("Two.\n<tool_call>\n<function=note>\n<parameter=text>\none\n</parameter>\n</function>\n"
                      "</tool_call>\n<tool_call>\n<function=calc>\n<parameter=n>\n2\n</parameter>\n</function>\n"
                      "</tool_call>", False, [("note", {"text": "one"}), ("calc", {"n": 2})], "Two.", "", None),
    "in_reasoning": ("Let me call it.\n<tool_call>\n<function=note>\n<parameter=text>\nr\n</parameter>\n</function>\n"
                     "</tool_call>\n</think>\n\nAnd done.", True, [("note", {"text": "r"})], "And done.",
                     "Let me call it.", None),
    "unknown_function": ("<tool_call>\n<function=rm_rf>\n</function>\n</tool_call>", False, [],
                         "<tool_call>\n<function=rm_rf>\n</function>\n</tool_call>", "", "unknown function 'rm_rf'"),
    "no_function": ("<tool_call>\njust words\n</tool_call>", False, [], "<tool_call>\njust words\n</tool_call>", "",
                    "no <function=NAME> block"),
    "bare_unclosed": ("<function=note>\n<parameter=text>\ncut", False, [], "<function=note>\n<parameter=text>\ncut",
                      "", "not closed with </function>"),
}


@pytest.fixture(scope="module")
def qwen_tok():
    import tokenizer_fixture

    from qwen35.tokenizer import Tokenizer

    return Tokenizer(tokenizer_fixture.build())


@pytest.mark.parametrize("name", sorted(ROBUST))
def test_robust_shapes_whole_and_token_by_token(name, qwen_tok):
    text, thinking, calls, content, reasoning, error = ROBUST[name]
    d = parse_output(text, RTOOLS, thinking_open=thinking)
    assert [(c.name, c.arguments) for c in d.tool_calls] == calls
    assert d.content == content and d.reasoning == reasoning
    assert (error is None and d.errors == []) or any(error in e for e in d.errors), d.errors
    # the same text as the model would stream it: real Qwen3.5 tokens, one at a time
    ids = qwen_tok.encode(text)
    stream, p, acc = qwen_tok.text_stream(), OutputParser(RTOOLS, thinking_open=thinking), ParsedDelta()
    for i, t in enumerate(ids):
        acc += p.feed(stream.add(t, "length" if i == len(ids) - 1 else None))
    acc += p.finish()
    assert key(acc) == key(d)
    assert all(json.loads(c.arguments_json()) == c.arguments for c in acc.tool_calls)


def test_python_type_names_coerce():
    assert coerce("2.5", {"type": "float"}) == 2.5 and coerce("4", {"type": "int"}) == 4
    assert coerce('{"a": 1}', {"type": "dict"}) == {"a": 1} and coerce("[1]", {"type": "list"}) == [1]
    assert coerce("True", {"type": "bool"}) is True


def test_bare_function_is_text_when_no_tools_were_offered():
    text = "<function=note>\n<parameter=text>\nx\n</parameter>\n</function>"
    d = parse_output(text, None)
    assert d.tool_calls == [] and d.content == text


# ---- coercion by the whole schema: type lists, anyOf / oneOf / allOf, enum / const, $ref ----

UNIT_DEFS = {"$defs": {"Unit": {"enum": ["c", "f"]}, "Count": {"$ref": "#/$defs/Int"}, "Int": {"type": "integer"},
                       "Loop": {"$ref": "#/$defs/Loop"}, "Flag": {"anyOf": [{"type": "boolean"}, {"type": "null"}]}}}


@pytest.mark.parametrize("schema, text, value", [
    ({"anyOf": [{"type": "integer"}, {"type": "boolean"}]}, "true", True),  # the audit's case
    ({"anyOf": [{"type": "integer"}, {"type": "boolean"}]}, "7", 7),
    ({"anyOf": [{"type": "integer"}, {"type": "boolean"}]}, "False", False),  # the template's Python spelling
    ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, '"7"', "7"),  # a string written as JSON, as the grammar does
    ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, "7", 7),
    ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, "seven", "seven"),  # a raw string (no grammar)
    ({"type": ["integer", "null"]}, "null", None),
    ({"type": ["integer", "null"]}, "None", None),
    ({"type": ["string", "number"]}, "2.5", 2.5),
    ({"type": ["string", "number"]}, '"x y"', "x y"),
    ({"type": "integer", "nullable": True}, "null", None),  # OpenAPI's spelling
    ({"type": "string", "pattern": "^[a-z]+$"}, '"abc"', "abc"),  # the grammar writes such a string as JSON
    ({"type": "string", "pattern": "^[0-9]+$"}, "12345", "12345"),  # ... a model without it, raw
    ({"type": "string"}, '"quoted"', '"quoted"'),  # a plain string is raw text, quotes and all
    ({"enum": ["a", "b"]}, '"a"', '"a"'),  # so is an enum of strings
    ({"enum": [1, "a", None]}, "1", 1),
    ({"enum": [1, "a", None]}, '"a"', "a"),
    ({"const": True}, "true", True),
    ({"allOf": [{"type": "number"}, {"minimum": 0}]}, "3", 3),
    ({"allOf": [{"type": ["integer", "string"]}, {"type": "integer"}]}, '"3"', '"3"'),  # only integer is common
    ({}, "5", 5),  # any JSON, as the grammar writes it
    ({}, '{"k": [1]}', {"k": [1]}),
    ({}, "007", "007"),  # not JSON: text (a schema that says nothing gets no loose readings)
    ({"description": "any"}, "New York", "New York"),
    ({"type": "integer"}, "1e2", 100),  # a number with no fraction is an integer to JSON Schema
    pytest.param({"type": "array"}, "[" * 5000 + "]" * 5000, "[" * 5000 + "]" * 5000, id="past-recursion-limit"),
    ({"type": "strnig"}, "1", "1"),  # no type this parser knows: text
])
def test_coerce_reads_the_whole_schema(schema, text, value):
    got = coerce(text, schema)
    assert got == value and type(got) is type(value), got


@pytest.mark.parametrize("schema, text, value", [
    ({"$ref": "#/$defs/Int"}, "4", 4),
    ({"$ref": "#/$defs/Count"}, "4", 4),  # a $ref to a $ref
    ({"$ref": "#/$defs/Unit"}, '"c"', "c"),  # the referenced enum of strings, written as JSON
    ({"allOf": [{"$ref": "#/$defs/Flag"}]}, "null", None),  # pydantic's shape
    ({"$ref": "#/$defs/Flag"}, "true", True),
    ({"$ref": "#/$defs/Loop"}, "5", 5),  # a cycle says nothing: any JSON
    ({"$ref": "#/$defs/Missing"}, "5", 5),
    ({"$ref": "https://example.com/s.json"}, '"x"', "x"),  # never fetched
])
def test_coerce_follows_local_refs_into_the_parameters(schema, text, value):
    got = coerce(text, schema, UNIT_DEFS)
    assert got == value and type(got) is type(value), got


def test_xml_call_arguments_follow_anyof_and_refs():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "$defs": {"N": {"type": "integer"}},
        "properties": {"a": {"anyOf": [{"type": "integer"}, {"type": "boolean"}]}, "n": {"$ref": "#/$defs/N"},
                       "m": {"type": ["number", "null"]}, "s": {"oneOf": [{"type": "string"}, {"type": "null"}]}}}}}]
    text = ("<tool_call>\n<function=f>\n<parameter=a>\ntrue\n</parameter>\n<parameter=n>\n12\n</parameter>\n"
            "<parameter=m>\nnull\n</parameter>\n<parameter=s>\n\"hi\"\n</parameter>\n</function>\n</tool_call>")
    want = {"a": True, "n": 12, "m": None, "s": "hi"}
    assert parse_output(text, tools).tool_calls[0].arguments == want
    p, acc = OutputParser(tools), ParsedDelta()
    for ch in text:  # streamed: the pieces carry the same typed values
        acc += p.feed(ch)
    acc += p.finish()
    assert acc.tool_calls[0].arguments == want
    assert acc.tool_calls[0].arguments_json() == json.dumps(want)


GRAMMAR_SCHEMAS = [
    {"anyOf": [{"type": "integer"}, {"type": "boolean"}]},
    {"oneOf": [{"type": "string", "maxLength": 5}, {"type": "integer"}]},
    {"type": ["integer", "null"]},
    {"type": ["string", "number"]},
    {"type": "string", "pattern": "^[a-z ]+$"},
    {"type": "string"},
    {"enum": ["c", "f"]},
    {"enum": [1, "a", None]},
    {"const": True},
    {"allOf": [{"type": "number"}, {"minimum": 0}]},
    {"anyOf": [{"type": "array", "items": {"type": "integer"}}, {"type": "object"}]},
    {},
]
CANDIDATES = ["true", "false", "7", "-3", "2.5", "null", '"abc"', "abc", '"a"', "a", "c", "f", "1", "[1, 2]",
              '{"k": 1}', '"x y"', "x y", "True"]


@pytest.mark.parametrize("i", range(len(GRAMMAR_SCHEMAS)))
def test_what_the_tool_call_grammar_allows_comes_back_as_its_json(i, qwen_tok):
    """Every value the grammar lets the model write for a parameter comes back as a value valid for the
    parameter's schema, and, where the grammar writes JSON, as exactly that JSON."""
    import jsonschema

    from qwen35.constrain import GrammarError, Structured, engine_for

    schema = GRAMMAR_SCHEMAS[i]
    params = {"type": "object", "required": ["x"], "properties": {"x": schema}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": params}}]
    grammar = engine_for(qwen_tok, qwen_tok.vocab_size).compile(Structured.tool_calls(tools))
    raw = schema.get("type") == "string" and "pattern" not in schema or schema == {"enum": ["c", "f"]}
    allowed = 0
    for text in CANDIDATES:
        call = f"<tool_call>\n<function=f>\n<parameter=x>\n{text}\n</parameter>\n</function>\n</tool_call>"
        m = grammar.matcher()
        try:
            for t in qwen_tok.encode(call):
                m.advance(t)
        except GrammarError:
            continue
        if not m.accepting:
            continue
        allowed += 1
        (got,) = parse_output(call, tools).tool_calls
        jsonschema.validate(got.arguments, params)
        value = got.arguments["x"]
        want = text if raw else json.loads(text)
        assert value == want and type(value) is type(want), (text, value)
    assert allowed >= (1 if "const" in schema else 2)


def test_hostile_schemas_cost_little():
    # each definition names the next twice: walked naively that is 2**40 visits
    defs = {f"D{i}": {"anyOf": [{"$ref": f"#/$defs/D{i + 1}"}, {"$ref": f"#/$defs/D{i + 1}"}]} for i in range(40)}
    defs["D40"] = {"type": "integer"}
    assert coerce("3", {"$ref": "#/$defs/D0"}, {"$defs": defs}) == 3
    deep: dict = {"type": "boolean"}
    for _ in range(5000):  # nested past Python's recursion limit
        deep = {"anyOf": [deep]}
    assert coerce("true", deep) is True  # read as saying nothing past the cap: any JSON


# ---- tags written as prose; values that hold tags; several functions in one block; numbers JSON lacks ----

PROSE = {  # name: (text, [(name, arguments)], reasoning, content, errors); all with thinking_open
    "mention_then_answer": (STREAMS[14], [], "Do I need a <tool_call> here? No.", "Paris.",
                            ["tool call was not closed with </tool_call> before </think>"]),
    "mention_then_call": (STREAMS[15], [("get_weather", {"days": 3, "city": "New York", "metric": True,
                                                         "ratio": 0.5, "opts": {"unit": "C"}, "tags": ["a", 1]})],
                          "I'll reply with a <tool_call> block.", "Let me check.",
                          ["tool call was not closed with </tool_call> before </think>"]),
    "bare_mention": (STREAMS[16], [], "I could use <function=note> but no need.", "It is sunny.",
                     ["tool call was not closed with </function> before </think>"]),
    "second_call_opens": ("Maybe <tool_call> or not. <tool_call>\n<function=note>\n<parameter=text>\nhi\n"
                          "</parameter>\n</function>\n</tool_call>\n</think>\n\nDone.",
                          [("note", {"text": "hi"})], "Maybe <tool_call> or not.", "Done.",
                          ["tool call was not closed with </tool_call> before <tool_call>"]),
    "complete_call_missing_its_close": ("Call:\n<tool_call>\n<function=note>\n<parameter=text>\nhi\n</parameter>\n"
                                        "</function>\n</think>\n\nDone.", [("note", {"text": "hi"})], "Call:",
                                        "Done.",
                                        ["tool call was not closed with </tool_call> before </think>; parsed anyway"]),
    "cut_in_a_value": ("<tool_call>\n<function=note>\n<parameter=text>\nhal</think>f", [],
                       "<tool_call>\n<function=note>\n<parameter=text>\nhal", "f",
                       ["tool call was not closed with </tool_call> before </think>"]),
}


@pytest.mark.parametrize("name", sorted(PROSE))
def test_a_tag_written_as_prose_loses_nothing(name):
    """</think> still ends the reasoning, and a second <tool_call> starts a call, while a <tool_call> is open:
    the open one was prose (or cut off), and its text is reasoning again."""
    text, calls, reasoning, content, errors = PROSE[name]
    d = whole(text, True)
    assert ([(c.name, c.arguments) for c in d.tool_calls], d.reasoning, d.content, d.errors) == \
        (calls, reasoning, content, errors)
    p, acc = OutputParser(TOOLS, thinking_open=True), ParsedDelta()
    for ch in text:
        acc += p.feed(ch)
    acc += p.finish()
    assert key(acc) == key(d)


CODE_TOOLS = [{"type": "function", "function": {"name": "run", "parameters": {"type": "object", "properties": {
    "code": {"type": "string"}, "n": {"type": "integer"}}}}}]
TAGGED_VALUES = {  # name: (a function body's parameters, the arguments it gives)
    "function_close": ("<parameter=code>\nprint('</function>')\n</parameter>\n<parameter=n>\n1\n</parameter>\n",
                       {"code": "print('</function>')", "n": 1}),
    "parameter_open": ("<parameter=code>\nx = '<parameter=n>'\n</parameter>\n", {"code": "x = '<parameter=n>'"}),
    "parameter_close": ("<parameter=code>\ns = '</parameter>'\n</parameter>\n", {"code": "s = '</parameter>'"}),
    "all_three": ("<parameter=code>\n'</parameter></function><parameter=n>'\n</parameter>\n<parameter=n>\n2\n"
                  "</parameter>\n", {"code": "'</parameter></function><parameter=n>'", "n": 2}),
    "missing_close_mid": ("<parameter=code>\npass\n<parameter=n>\n3\n</parameter>\n", {"code": "pass", "n": 3}),
    "junk_after_function": ("<parameter=n>\n4\n</parameter>\n", {"n": 4}),
}


@pytest.mark.parametrize("name, form", [(n, f) for n in sorted(TAGGED_VALUES) for f in ("tool_call", "bare")
                                        # a bare call ends at the first "</parameter></function>": nothing after it
                                        # says more text belongs to the call
                                        if (n, f) != ("all_three", "bare")])
def test_a_value_runs_to_the_closing_tag_that_ends_it(name, form):
    """A value ends at a </parameter> that the next parameter, or </function> and nothing more, follows; a tag
    in the middle of a line inside it is part of it."""
    params, args = TAGGED_VALUES[name]
    call = "<function=run>\n" + params + "</function>"
    text = ("Run:\n<tool_call>\n" + call + "\n</tool_call>" if form == "tool_call" else "Run:\n" + call) + "\nDone."
    if name == "junk_after_function":  # no </tool_call>: the call ends with the text, after a line of junk
        text = "Run:\n<tool_call>\n" + call + "\nDone." if form == "tool_call" else "Run:\n" + call + "\nDone."
    d = parse_output(text, CODE_TOOLS)
    assert [(c.name, c.arguments) for c in d.tool_calls] == [("run", args)]
    assert (d.content, d.reasoning) == (("Run:", "") if name == "junk_after_function" and form == "tool_call"
                                        else ("Run:\nDone.", ""))
    assert d.errors == (["tool call was not closed with </tool_call>; parsed anyway"]
                        if name == "junk_after_function" and form == "tool_call" else [])
    p, acc = OutputParser(CODE_TOOLS), ParsedDelta()
    for ch in text:
        acc += p.feed(ch)
    acc += p.finish()
    assert key(acc) == key(d)


def test_a_json_string_value_holding_tags_keeps_the_parameters_after_it():
    # what the bundled model wrote under tool_choice "required" (the audit's raw text): b had gone missing
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": ["string", "null"]}, "b": {"type": "boolean"}}, "required": ["a", "b"]}}}]
    text = ('<tool_call>\n<function=f>\n<parameter=a>\n"\\toather</functionlib.chains</parameter></function>'
            '</function>."\n</parameter>\n<parameter=b>\ntrue\n</parameter>\n</function>\n</tool_call>')
    (call,) = parse_output(text, tools).tool_calls
    assert call.arguments == {"a": "\toather</functionlib.chains</parameter></function></function>.", "b": True}


def test_one_block_may_hold_several_functions():
    d = whole(STREAMS[19], False)
    assert [(c.name, c.arguments) for c in d.tool_calls] == [("note", {"text": "A"}), ("note", {"text": "B"})]
    assert (d.content, d.errors) == ("", [])
    assert d.tool_calls[0].id != d.tool_calls[1].id
    # one unknown function makes the whole block text, as any malformed call
    bad = STREAMS[19].replace("<function=note>\n<parameter=text>\nB", "<function=nope>\n<parameter=text>\nB")
    d = whole(bad, False)
    assert (d.tool_calls, d.content, d.errors) == ([], bad, ["model called unknown function 'nope'"])


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", "inf", "nan", "1e999", "[1, NaN]"])
@pytest.mark.parametrize("schema", [{"type": "number"}, {"type": "integer"}, {}, {"type": ["number", "array"]}])
def test_numbers_json_lacks_stay_text(text, schema):
    """NaN, Infinity and numbers past a float's range are kept as the text, as any value its type cannot take."""
    assert coerce(text, schema) == text


def test_tool_call_arguments_are_always_json():
    d = parse_output('<tool_call>{"name": "note", "arguments": {"text": NaN}}</tool_call>', TOOLS)
    assert d.tool_calls == [] and d.errors == ["tool call is not valid JSON (NaN is not a JSON number)"]
    d = parse_output('<tool_call>{"name": "note", "arguments": "{\\"text\\": Infinity}"}</tool_call>', TOOLS)
    assert d.tool_calls == [] and d.errors == ["arguments of tool call 'note' are not valid JSON"]
    (call,) = parse_output("<tool_call>\n<function=get_weather>\n<parameter=ratio>\nNaN\n</parameter>\n"
                           "</function>\n</tool_call>", TOOLS).tool_calls
    assert call.arguments_json() == '{"ratio": "NaN"}'
    with pytest.raises(ValueError):  # never written as JSON that a JavaScript client cannot read
        call.__class__("f", {"x": float("nan")}).arguments_json()


@pytest.mark.parametrize("text, value", [("5.0", 5), ("1e3", 1000), ("-2.000", -2), ("1E+2", 100),
                                         ("12345678901234567890.0", 12345678901234567890), ("1.5", "1.5"),
                                         ("1e-3", "1e-3"), ("1e999", "1e999"), ("five", "five")])
def test_an_integral_number_is_an_integer(text, value):
    got = coerce(text, {"type": "integer"})
    assert got == value and type(got) is type(value)
    got = coerce(text, {"anyOf": [{"type": "integer"}, {"type": "null"}]})
    assert got == value and type(got) is type(value)


SOUP = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<function=note>", "<function=nope>", "</function>",
        "<parameter=text>", "</parameter>", "\n", " ", "x", "5", "NaN", '{"name": "note"}', "<", "</"]


def test_tag_soup_splits_like_the_whole_and_loses_no_text():
    """Random runs of tags and text: any split gives the whole's result, every call's arguments are JSON,
    and with no call taken every character is reasoning or content (whitespace and think tags aside)."""
    r = random.Random(7)
    for trial in range(1500):
        s = "".join(r.choice(SOUP) for _ in range(r.randint(1, 30)))
        thinking = r.random() < 0.5
        d = whole(s, thinking)
        p, acc = OutputParser(TOOLS, thinking_open=thinking), ParsedDelta()
        cuts = sorted(r.sample(range(1, len(s)), min(len(s) - 1, r.randint(0, 12)))) if len(s) > 1 else []
        for a, b in zip([0] + cuts, cuts + [len(s)]):
            acc += p.feed(s[a:b])
        acc += p.finish()
        assert key(acc) == key(d), (s, thinking, cuts)
        assert all(json.loads(c.arguments_json()) == c.arguments for c in d.tool_calls)
        if not d.tool_calls:
            def bare(t):
                return sorted(t.replace("<think>", "").replace("</think>", "").replace(" ", "").replace("\n", ""))
            assert bare(d.reasoning + d.content) == bare(s), (s, thinking)
