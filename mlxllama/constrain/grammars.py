"""Output formats -> llguidance grammars, checked without a tokenizer.

Every constructor returns a `Grammar` (the kind, the llguidance grammar text, a short description)
or raises `GrammarError` with the engine's message. `as_grammar` accepts everything the
`response_format=` argument of the Python API takes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import GrammarError

KINDS = ("json_schema", "json_object", "regex", "lark", "gbnf", "grammar", "choice")
# Compact JSON, as the OpenAI API writes it: ", " and ": ", no newlines or indentation (a small
# model given flexible whitespace can spend its whole budget on it). A schema's own "x-guidance"
# settings win over these.
JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Grammar:
    kind: str  # one of KINDS
    text: str  # the llguidance grammar
    description: str  # for messages: "JSON schema", "regex '[0-9]+'", ...
    schema: dict | None = None  # the JSON schema, for kind json_schema / json_object


def _llg():
    try:
        import llguidance
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise GrammarError(f"constrained decoding needs the llguidance package: {e}") from None
    return llguidance


def check(grammar: Grammar, tokenizer=None) -> Grammar:
    """Raises GrammarError with the engine's message unless the grammar compiles."""
    llg = _llg()
    failed, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar.text, tokenizer)
    if failed:
        raise GrammarError(f"invalid {grammar.description}: {_one_line(messages[0] if messages else 'rejected')}")
    return grammar


def _one_line(message: str) -> str:
    """The engine's message on one line: its first line plus the regex parser's "error:" line."""
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    if not lines:
        return "rejected"
    detail = next((ln for ln in lines[1:] if ln.startswith("error:")), None)
    first = lines[0].removesuffix("regex parse error:").rstrip(" :")
    return f"{first}: {detail[len('error:'):].strip()}" if detail else first


def schema_of(spec: Any) -> dict:
    """A JSON schema from a dict, JSON text, or a Pydantic model class."""
    if isinstance(spec, type) and hasattr(spec, "model_json_schema"):
        return spec.model_json_schema()
    if isinstance(spec, (str, bytes)):
        try:
            spec = json.loads(spec)
        except ValueError as e:
            raise GrammarError(f"the JSON schema is not valid JSON: {e}") from None
    if isinstance(spec, bool):
        spec = {} if spec else {"not": {}}
    if not isinstance(spec, dict):
        raise GrammarError(f"a JSON schema must be an object (or a Pydantic model class), got {type(spec).__name__}")
    return spec


def json_schema(spec: Any) -> Grammar:
    schema = schema_of(spec)
    try:
        text = _llg().LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS)
    except (ValueError, TypeError) as e:
        raise GrammarError(f"invalid JSON schema: {e}") from None
    return check(Grammar("json_schema", text, "JSON schema", schema))


def json_object() -> Grammar:
    g = json_schema({"type": "object"})
    return Grammar("json_object", g.text, "JSON object", g.schema)


def regex(pattern: str) -> Grammar:
    if not isinstance(pattern, str) or not pattern:
        raise GrammarError("the regex must be a non-empty string")
    return check(Grammar("regex", _llg().LLMatcher.grammar_from_regex(pattern), f"regex {pattern[:60]!r}"))


def lark(source: str) -> Grammar:
    if not isinstance(source, str) or not source.strip():
        raise GrammarError("the Lark grammar is empty")
    return check(Grammar("lark", _llg().LLMatcher.grammar_from_lark(source), "Lark grammar"))


def gbnf(source: str) -> Grammar:
    """A llama.cpp GBNF grammar (`root ::= ...`), converted to Lark by llguidance."""
    if not isinstance(source, str) or not source.strip():
        raise GrammarError("the GBNF grammar is empty")
    from llguidance.gbnf_to_lark import gbnf_to_lark

    try:
        converted = gbnf_to_lark(source)
    except Exception as e:  # the converter raises its own error type and plain ones
        raise GrammarError(f"invalid GBNF grammar: {_one_line(str(e))}") from None
    return check(Grammar("gbnf", _llg().LLMatcher.grammar_from_lark(converted), "GBNF grammar"))


def grammar(source: str) -> Grammar:
    """A grammar in either syntax: GBNF when it defines rules with '::=', else Lark."""
    from llguidance.gbnf_to_lark import is_lark_syntax

    if isinstance(source, str) and not is_lark_syntax(source):
        return gbnf(source)
    return lark(source)


def choice(options: Sequence[str]) -> Grammar:
    if isinstance(options, str) or not options or not all(isinstance(o, str) and o for o in options):
        raise GrammarError("choices must be a non-empty list of non-empty strings")
    source = "start: " + " | ".join(json.dumps(o) for o in options)
    return check(Grammar("choice", _llg().LLMatcher.grammar_from_lark(source), "choice list"))


def grammar_file(path: str | Path) -> Grammar:
    """A grammar from a file: .gbnf is GBNF, .lark is Lark, anything else by its syntax."""
    p = Path(path)
    try:
        source = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GrammarError(f"cannot read grammar file {p}: {e}") from None
    if p.suffix == ".gbnf":
        return gbnf(source)
    if p.suffix == ".lark":
        return lark(source)
    return grammar(source)


def make(kind: str, spec: Any = None) -> Grammar:
    """One entry point for every kind: make("regex", "[0-9]+"), make("json_schema", {...}), ..."""
    makers = {"json_schema": json_schema, "regex": regex, "lark": lark, "gbnf": gbnf, "grammar": grammar,
              "choice": choice}
    if kind == "json_object":
        return json_object()
    if kind not in makers:
        raise GrammarError(f"unknown constraint kind {kind!r}; expected one of {', '.join(KINDS)}")
    return makers[kind](spec)


def as_grammar(response_format: Any) -> Grammar | None:
    """What `response_format=` accepts -> a Grammar, or None for unconstrained text:

    - None, "text", {"type": "text"}: no constraint;
    - a Grammar (from the constructors here);
    - a Pydantic model class, or a JSON schema (dict or JSON text);
    - the OpenAI forms {"type": "json_object"} and {"type": "json_schema", "json_schema": {"schema": ...}};
    - {"type": "regex", "regex": ...}, {"type": "lark" | "gbnf" | "grammar", "grammar": ...},
      {"type": "choice", "choices": [...]}.
    """
    if response_format is None or response_format == "text":
        return None
    if isinstance(response_format, Grammar):
        return response_format
    if isinstance(response_format, dict) and isinstance(response_format.get("type"), str):
        kind = response_format["type"]
        if kind == "text":
            return None
        if kind == "json_object":
            return json_object()
        if kind == "json_schema" and ("json_schema" in response_format or "schema" in response_format):
            inner = response_format.get("json_schema", response_format)
            if not isinstance(inner, dict) or "schema" not in inner:
                raise GrammarError("response_format json_schema needs a 'schema'")
            return json_schema(inner["schema"])
        if kind == "regex" and "regex" in response_format:
            return regex(response_format["regex"])
        if kind in ("lark", "gbnf", "grammar") and "grammar" in response_format:
            return make(kind, response_format["grammar"])
        if kind == "choice" and "choices" in response_format:
            return choice(response_format["choices"])
    return json_schema(response_format)  # a plain JSON schema
