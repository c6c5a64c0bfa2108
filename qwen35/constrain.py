"""Constrained decoding: the grammar engine behind one small interface.

`Structured` says what an answer must be (a JSON schema, any JSON object, a regex, a Lark grammar, or Qwen3.5
XML tool calls for given tools); `GrammarEngine(tokenizer, vocab_size).compile(spec)` turns it into a
`Grammar`, and `grammar.matcher()` gives one row its own state: `fill_mask` (which tokens may come next),
`advance(token)`, `rollback(n)`, `accepting` / `done`.

Engine: llguidance. Measured on the Qwen3.5 tokenizer (248,320 ids, 2 shared cores; benchmarks/
bench_structured.py has the numbers): a nested JSON schema compiles in ~2 ms and costs ~0.2-0.6 ms of mask per
token, computed lazily from the parser state (no vocabulary-sized index per grammar). outlines-core builds an
index of the whole vocabulary per regex up front: the same schema had not compiled after 10 minutes, which
rules it out for per-request schemas. xgrammar is fast per token too, but pulls in triton, transformers and
apache-tvm-ffi (hundreds of MB); llguidance is one 3 MB wheel with no dependencies, and has Lark grammars
with embedded JSON schemas (`%json{...}`), which the tool-call grammar needs.

The llguidance tokenizer takes a few seconds to build from 248K tokens, so there is one engine per
tokenizer (`engine_for`), built on first use.

llguidance compiles a grammar recursively: a request's schema with a `$ref` chain 1000 long (125 KB, JSON
nesting 7) or a Lark chain of 5000 rules overflowed an 8 MiB thread stack, and a stack overflow is a SIGSEGV
that kills the whole server. Compiling therefore runs on a thread of its own with a 256 MiB stack (address
space, only touched pages are memory), where llguidance's own limits ("schema too large") come first; rows get
copies of the matcher made there (`deep_copy`, which does not compile again), so the decode thread never
recurses through the grammar.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass

import numpy as np
import torch

from .errors import Qwen35Error

KINDS = ("json_schema", "json_object", "regex", "grammar", "tool_call")
# compact JSON (json.dumps' own separators, no free whitespace): a model that may pad with whitespace forever
# cannot, and the answer reads as one line
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(Qwen35Error, ValueError):
    """A schema, regex or grammar that cannot constrain generation; the message says why."""


@dataclass(frozen=True)
class Structured:
    """What the answer must be. kind: one of KINDS; source: the schema (JSON text), regex, Lark grammar, or
    the tools (JSON text of a list of OpenAI tool objects); strict: for json_schema, refuse keywords the
    engine cannot enforce (False: ignore them, the answer is then only as strict as what is enforced)."""

    kind: str
    source: str = ""
    strict: bool = True

    def __post_init__(self):
        if self.kind not in KINDS:
            raise GrammarError(f"structured output kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind in ("json_schema", "tool_call"):
            try:
                value = json.loads(self.source)
            except json.JSONDecodeError as e:
                raise GrammarError(f"the {self.kind} source is not valid JSON ({e})") from None
            if self.kind == "json_schema" and not isinstance(value, dict):
                raise GrammarError("a JSON schema must be an object")
            if self.kind == "tool_call" and not (isinstance(value, list) and value):
                raise GrammarError("a tool_call constraint needs a non-empty list of tools")
        if self.kind in ("regex", "grammar") and not self.source:
            raise GrammarError(f"the {self.kind} constraint is empty")

    @classmethod
    def json_schema(cls, schema: dict, strict: bool = True) -> Structured:
        return cls("json_schema", json.dumps(schema), strict)

    @classmethod
    def json_object(cls) -> Structured:
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> Structured:
        return cls("regex", pattern)

    @classmethod
    def grammar(cls, lark: str) -> Structured:
        return cls("grammar", lark)

    @classmethod
    def tool_calls(cls, tools: list[dict]) -> Structured:
        """One or more `<tool_call>` blocks calling the given tools with schema-valid parameters."""
        return cls("tool_call", json.dumps(tools))


class Grammar:
    """A compiled constraint for one tokenizer; `matcher()` makes per-row states."""

    def __init__(self, engine: GrammarEngine, spec: Structured, compiled: str):
        import llguidance

        self.engine, self.spec, self.compiled = engine, spec, compiled
        # the start state, made once (on the compile thread: making one compiles the grammar again)
        self._start = llguidance.LLMatcher(engine.lltok, compiled, log_level=0)
        if self._start.is_error():
            raise GrammarError(f"the {spec.kind} constraint cannot start: {self._start.get_error()}")

    def matcher(self) -> Matcher:
        return Matcher(self._start.deep_copy(), self.engine.vocab_size)


class Matcher:
    """One row's grammar state."""

    def __init__(self, m, vocab_size: int):
        self.m, self.vocab_size = m, vocab_size
        self.bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)

    def fill_mask(self) -> np.ndarray:
        """The allowed next tokens as a bitmask, int32 [ceil(V / 32)], bit i of word w = token 32 w + i."""
        self.m.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)
        if self.m.is_error():  # (its mask then holds only the end tokens: the answer would end, silently empty)
            raise GrammarError(f"the constraint failed: {_first_line(self.m.get_error())}")
        return self.bits

    def allowed(self) -> torch.Tensor:
        """bool [V]: True where the token may come next."""
        unpacked = np.unpackbits(self.fill_mask().view(np.uint8), bitorder="little")[: self.vocab_size]
        return torch.from_numpy(unpacked.view(np.bool_))

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """fp32 logits [1, V] with every token the grammar forbids at -inf (a new tensor). In numpy, on one
        thread: a torch op over 248K entries wakes the OpenMP team, which on a loaded machine cost 60 ms per
        token here against 0.5 ms for this (benchmarks/bench_structured.py)."""
        allowed = np.unpackbits(self.fill_mask().view(np.uint8), bitorder="little")[: self.vocab_size]
        x = logits.detach().float().cpu().numpy()
        return torch.from_numpy(np.where(allowed.view(np.bool_), x, np.float32(-np.inf)))

    def advance(self, token: int) -> None:
        if not self.m.consume_token(int(token)):
            raise GrammarError(f"token {token} does not fit the grammar: {self.m.get_error()}")

    def rollback(self, n: int) -> None:
        """Undo the last n advanced tokens (speculative decoding can verify against the grammar this way)."""
        if not self.m.rollback(n):
            raise GrammarError(f"cannot roll the grammar back {n} tokens: {self.m.get_error()}")

    @property
    def accepting(self) -> bool:
        """The text so far is a complete answer (an end-of-turn token may come now)."""
        return self.m.is_accepting()

    @property
    def done(self) -> bool:
        return self.m.is_stopped()


class GrammarEngine:
    """llguidance bound to one tokenizer and the model's vocabulary size (ids past the tokenizer's own are
    never allowed)."""

    def __init__(self, tokenizer, vocab_size: int):
        import llguidance

        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.lltok = llguidance.LLTokenizer(tokenizer.hf_json(), n_vocab=vocab_size,
                                            eos_token=list(tokenizer.eos_token_ids))
        self._cache: dict[Structured, Grammar] = {}

    def compile(self, spec: Structured) -> Grammar:
        g = self._cache.get(spec)
        if g is None:
            g = on_a_deep_stack(lambda: self._grammar(spec))
            if len(self._cache) > 256:  # one per distinct request schema: bounded
                self._cache.clear()
            self._cache[spec] = g
        return g

    def _grammar(self, spec: Structured) -> Grammar:
        g = Grammar(self, spec, self._compile(spec))
        start = g.matcher()
        try:
            first = start.allowed()
        except GrammarError as e:  # llguidance's "NoExtensionBias": no token can begin an answer
            reason = str(e).removeprefix("the constraint failed: ")
            raise GrammarError(f"the {spec.kind} constraint admits no text at all" if "NoExtension" in reason
                               else f"the {spec.kind} constraint cannot start: {reason}") from None
        first[[i for i in self.tokenizer.eos_token_ids if i < self.vocab_size]] = False
        if not start.accepting and not first.any():
            # e.g. the regex [^\x00-\U0010FFFF]: it compiles, and llguidance then offers only the end
            # tokens, so each answer would have ended empty with finish_reason "stop"
            raise GrammarError(f"the {spec.kind} constraint admits no text at all")
        return g

    def _compile(self, spec: Structured) -> str:
        import llguidance

        L = llguidance.LLMatcher
        try:
            if spec.kind == "json_schema":
                grammar = L.grammar_from_json_schema(spec.source, defaults=JSON_OPTIONS,
                                                     overrides={"lenient": not spec.strict})
            elif spec.kind == "json_object":
                grammar = L.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
            elif spec.kind == "regex":
                grammar = L.grammar_from_regex(spec.source)
            elif spec.kind == "grammar":
                grammar = L.grammar_from_lark(spec.source)
            else:
                grammar = L.grammar_from_lark(tool_call_lark(json.loads(spec.source), self.tokenizer))
        except (ValueError, TypeError, RuntimeError) as e:
            raise GrammarError(f"the {spec.kind} constraint cannot be compiled: {e}") from None
        error = L.validate_grammar(grammar, self.lltok)
        if error:
            raise GrammarError(f"the {spec.kind} constraint cannot be compiled: {error.strip()}")
        return grammar


def _first_line(error: str) -> str:
    """llguidance's error without the parser state it appends (dozens of lines of internals)."""
    return (error.strip().splitlines() or [""])[0]


COMPILE_STACK_BYTES = 256 * 2**20
_stack_lock = threading.Lock()


def on_a_deep_stack(fn):
    """fn() on a thread with a COMPILE_STACK_BYTES stack (module docstring), its result returned or its
    exception raised here. The stack size is process-wide while a thread starts: held under a lock and put
    back at once."""
    box: dict = {}

    def run():
        try:
            box["out"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller, whatever it is
            box["error"] = e

    with _stack_lock:
        old = threading.stack_size(COMPILE_STACK_BYTES)
        try:
            t = threading.Thread(target=run, name="qwen35-grammar-compile", daemon=True)
            t.start()
        finally:
            threading.stack_size(old)
    t.join()
    if "error" in box:
        raise box["error"]
    return box["out"]


_engines: dict[tuple[int, int], GrammarEngine] = {}
_engines_lock = threading.Lock()


def engine_for(tokenizer, vocab_size: int) -> GrammarEngine:
    """The grammar engine of this tokenizer (built once: a few seconds for a 248K vocabulary)."""
    key = (id(tokenizer), vocab_size)
    with _engines_lock:
        e = _engines.get(key)
        if e is None or e.tokenizer is not tokenizer:
            e = _engines[key] = GrammarEngine(tokenizer, vocab_size)
        return e


# ---- Qwen3.5 XML tool calls as a Lark grammar ----

def _lark_str(s: str) -> str:
    return json.dumps(s)


def _rx(s: str) -> str:
    """`s` as literal text inside a Lark /regex/."""
    return re.sub(r"([\\.^$|?*+()\[\]{}/-])", r"\\\1", s).replace("\n", "\\n")


def _param_rule(key: str, schema: dict, defs: dict | None = None) -> str:
    """One `<parameter=key>` block, its value as the Qwen3.5 format writes it: strings raw (without '<', so
    the value cannot run into the closing tag; maxLength bounds it) as one regex with the tags around it
    (one lexeme, so the newline before the closing tag is never taken for part of the value); enums of
    strings as alternatives; every other type as JSON for its schema, with the parameters' definitions
    (`defs`: their $defs / definitions) beside it, so a local $ref into them resolves."""
    if not isinstance(schema, dict):
        schema = {}
    head, tail = f"<parameter={key}>\n", "\n</parameter>\n"
    enum = schema.get("enum")
    if isinstance(enum, list) and enum and all(isinstance(v, str) for v in enum):
        return "/" + _rx(head) + "(" + "|".join(_rx(v) for v in enum) + ")" + _rx(tail) + "/"
    if schema.get("type") == "string" and "pattern" not in schema and "format" not in schema:
        lo, hi = int(schema.get("minLength", 0)), schema.get("maxLength")
        count = f"{{{lo},{int(hi)}}}" if hi is not None else (f"{{{lo},}}" if lo else "*")
        return "/" + _rx(head) + "[^<]" + count + _rx(tail) + "/"
    return f"{_lark_str(head)} %json{json.dumps({**schema, **(defs or {})})} {_lark_str(tail)}"


def tool_call_lark(tools: list[dict], tokenizer) -> str:
    """Lark for one or more XML tool calls to `tools` (OpenAI tool objects), each parameter's value valid for
    its schema, required ones present, in the schema's order. `<tool_call>` / `</tool_call>` are the single
    control tokens (by id), as the model writes them."""
    ids = [tokenizer.token_to_id(t) for t in ("<tool_call>", "</tool_call>")]
    if None in ids:
        raise GrammarError("this tokenizer has no <tool_call> / </tool_call> tokens")
    rules = ["start: call (\"\\n\" call)*", f"call: <[{ids[0]}]> \"\\n\" fn \"\\n\" <[{ids[1]}]>"]
    fns = []
    for i, t in enumerate(tools):
        fn = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise GrammarError(f"tools[{i}] is not a function with a name")
        name, schema = fn["name"], fn.get("parameters") or {}
        props = schema.get("properties") or {} if isinstance(schema, dict) else None
        required = schema.get("required") or [] if isinstance(schema, dict) else None
        if not isinstance(props, dict) or not isinstance(required, list):
            raise GrammarError(f"tool {name!r}: 'parameters' needs an object of 'properties' and a list 'required'")
        missing = [k for k in required if k not in props]
        if missing:
            raise GrammarError(f"tool {name!r}: required parameter {missing[0]!r} is not in 'properties'")
        defs = {k: schema[k] for k in ("$defs", "definitions") if isinstance(schema.get(k), dict)}
        parts = []
        for j, (key, sub) in enumerate(props.items()):
            if not re.fullmatch(r"[^<>\n]+", key):
                raise GrammarError(f"tool {name!r}: parameter name {key!r} cannot be written as <parameter=...>")
            rules.append(f"p{i}_{j}: {_param_rule(key, sub, defs)}")
            parts.append(f"p{i}_{j}" + ("" if key in required else "?"))
        rules.append(f"f{i}: {_lark_str(f'<function={name}>' + chr(10))} {' '.join(parts)} \"</function>\"")
        fns.append(f"f{i}")
    rules.append("fn: " + " | ".join(fns))
    return "\n".join(rules) + "\n"
