"""Structured output: JSON schemas, regexes, Lark and GBNF grammars and choice lists enforced token
by token with llguidance.

    from mlxllama.constrain import compile_constraint
    c = compile_constraint(tokenizer, "json_schema", {"type": "object", ...})
    generate(model, tokenizer, prompt, response_format=c)   # or the schema / Pydantic class itself

Invalid input raises `mlxllama.errors.GrammarError` with the engine's message.
"""

from .grammars import (Grammar, as_grammar, choice, gbnf, grammar, grammar_file, json_object, json_schema, lark,
                       make, regex, schema_of)
from .matcher import Constraint, ConstraintProcessor, apply_bitmask, compile_constraint, constraint_for, token_table

__all__ = [
    "Constraint", "ConstraintProcessor", "Grammar", "apply_bitmask", "as_grammar", "choice", "compile_constraint",
    "constraint_for", "gbnf", "grammar", "grammar_file", "json_object", "json_schema", "lark", "make", "regex",
    "schema_of", "token_table",
]
