"""A tool parameter's JSON schema, read for what a call's raw parameter text should become (`coerce`).

The XML tool-call form (`<parameter=NAME>value</parameter>`) carries every value as text; the schema says
whether "5" is the integer 5 or the string "5". This reads only what decides a value's JSON type: `type`
(Python's names too), `enum` / `const`, `anyOf` / `oneOf` / `allOf`, local `$ref`s, OpenAPI's `nullable`.
"""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal
from typing import Any


def tool_schemas(tools: list[dict] | None) -> dict[str, dict] | None:
    """Each offered tool's parameters schema by function name (None when no tools were offered)."""
    if not tools:
        return None
    out = {}
    for t in tools:
        fn = t.get("function", t) if isinstance(t, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            out[fn["name"]] = fn.get("parameters") or {}
    return out


# type names real tool definitions use beside JSON Schema's own (Python's, from generated schemas)
TYPE_ALIASES = {"int": "integer", "float": "number", "double": "number", "dict": "object", "list": "array",
                "bool": "boolean", "str": "string", "none": "null"}
JSON_TYPES = ("null", "boolean", "integer", "number", "string", "array", "object")
MAX_SCHEMA_DEPTH = 64  # nesting past this is read as saying nothing more (a request's schema: no RecursionError)
_NOT_JSON = object()


def coerce(value: str, schema: dict | None, root: dict | None = None) -> Any:
    """A raw parameter string turned into a value of a type its JSON schema allows, read as the tool-call grammar
    (constrain._param_rule) writes it: a plain string or an enum of strings raw, anything else as JSON for its
    schema. JSON of an allowed type is taken as it is; else each allowed type is tried in the schema's order on
    looser spellings (True, None, +5); the text is kept when none fits. root: the tool's parameters, which
    `$ref`s point into (the schema itself when not given)."""
    if not isinstance(schema, dict) or _raw_string(schema):
        return value
    types = _types(schema, schema if root is None else root, {})
    stripped = value.strip()
    try:
        parsed = loads_json(stripped)
    except (ValueError, RecursionError):  # not JSON, NaN and Infinity included (or nested past Python's limit)
        parsed = _NOT_JSON
    if parsed is not _NOT_JSON and (types is None or _json_type(parsed) in types):
        return parsed
    for t in types or ():  # a schema that says nothing takes JSON only: "007" stays text
        try:
            if t == "integer":
                return _integer(stripped)
            if t == "number":
                f = _finite(float(stripped))
                return int(f) if f.is_integer() and re.fullmatch(r"-?\d+", stripped) else f
        except (ValueError, ArithmeticError):  # (Decimal's InvalidOperation is an ArithmeticError)
            continue
        if t == "boolean" and stripped.lower() in ("true", "false"):
            return stripped.lower() == "true"
        if t == "null" and stripped.lower() in ("null", "none"):
            return None
    return value


def loads_json(text: str) -> Any:
    """json.loads refusing (ValueError) NaN, Infinity and numbers past a float's range: they are not JSON, and a
    tool call's arguments must parse in any client (JavaScript's JSON.parse among them)."""
    return json.loads(text, parse_constant=_not_a_number, parse_float=lambda s: _finite(float(s)))


def _not_a_number(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(f: float) -> float:
    if not math.isfinite(f):
        raise ValueError(f"{f} is not a JSON number")
    return f


def _integer(text: str) -> int:
    """The integer `text` writes, as an integer or as a number with no fractional part ("5.0", "1e3": JSON
    Schema's integers too); ValueError or ArithmeticError for anything else."""
    try:
        return int(text)
    except ValueError:
        pass
    d = Decimal(text)  # exact, unlike a float: "12345678901234567890.0" keeps every digit
    # a number past a float's range ("1e999") is Infinity to most JSON readers: refused, as Infinity is
    if not d.is_finite() or d != d.to_integral_value() or not math.isfinite(float(d)):
        raise ValueError(f"{text} is not an integer")
    return int(d)


def _raw_string(schema: dict) -> bool:
    """Is this parameter's value written as raw text (constrain._param_rule: an enum of strings, or a string with
    no pattern or format; a Python type name too, which the grammar does not take)?"""
    enum = schema.get("enum")
    if isinstance(enum, list) and enum and all(isinstance(v, str) for v in enum):
        return True
    t = schema.get("type")
    return isinstance(t, str) and TYPE_ALIASES.get(t, t) == "string" and "pattern" not in schema \
        and "format" not in schema


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    return "string" if isinstance(v, str) else "array" if isinstance(v, list) else "object"


def _types(schema: Any, root: Any, refs: dict, depth: int = 0) -> list[str] | None:
    """The JSON types a value of `schema` may take, in the order the schema names them ("number" brings
    "integer"), or None where it does not say: its `type` (one or a list, Python names too, OpenAPI's
    `nullable`), `enum` / `const`, the union of `anyOf` / `oneOf`, the common part of `allOf` and a local
    `$ref`; a value must fit every one of these that the schema has. refs: each $ref's answer, worked out
    once (a $ref back into itself says nothing; and branches that name the same $ref cost nothing twice, so
    a schema cannot make this exponential)."""
    if not isinstance(schema, dict) or depth > MAX_SCHEMA_DEPTH:
        return None
    says: list[list[str] | None] = []
    t = schema.get("type")
    if isinstance(t, (str, list)):
        names = [TYPE_ALIASES.get(x, x) for x in (t if isinstance(t, list) else [t]) if isinstance(x, str)]
        says.append(names + (["null"] if schema.get("nullable") is True else []))
    if isinstance(schema.get("enum"), list):
        says.append([_json_type(v) for v in schema["enum"]])
    if "const" in schema:
        says.append([_json_type(schema["const"])])
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            branches = [_types(sub, root, refs, depth + 1) for sub in schema[key]]
            says.append(None if None in branches else [x for b in branches for x in b])
    if isinstance(schema.get("allOf"), list):
        says += [_types(sub, root, refs, depth + 1) for sub in schema["allOf"]]
    ref = schema.get("$ref")
    if isinstance(ref, str):
        if ref not in refs:
            refs[ref] = None  # while it is worked out: a cycle back to it
            refs[ref] = _types(_pointer(root, ref), root, refs, depth + 1)
        says.append(refs[ref])
    out = None
    for names in says:
        if names is not None:
            names = _with_integer([x for x in names if x in JSON_TYPES])
            out = names if out is None else [x for x in out if x in names]
    return out


def _with_integer(names: list[str]) -> list[str]:
    """Without duplicates, and "integer" after "number" (an integer is a number)."""
    out = []
    for x in names:
        out += [y for y in ((x, "integer") if x == "number" else (x,)) if y not in out]
    return out


def _pointer(root: Any, ref: str) -> dict | None:
    """The schema a local `$ref` ("#/$defs/Unit", any JSON pointer into `root`) names; None for any other."""
    if not ref.startswith("#"):
        return None  # a remote schema: never fetched
    node = root
    for part in ref[1:].split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node if isinstance(node, dict) else None
