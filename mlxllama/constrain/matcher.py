"""Grammars applied during decoding: token tables, one matcher per sequence, the logits mask.

`token_table(tokenizer)` builds llguidance's tables once per tokenizer (about a second for a 49k
vocabulary) and keeps them while the tokenizer lives. `Constraint` is a grammar checked against
those tables; `Constraint.processor()` gives a fresh logits processor for one sequence:

    processor(tokens (L,) or (1, L), logits (1, V)) -> logits with disallowed tokens at -inf

It feeds the tokens that are new since its previous call to the matcher (the first call sees the
prompt only), then masks. EOS is allowed exactly when the grammar is complete; once the grammar
can take nothing more, EOS is the only token left. The mask is unpacked with plain mx operations,
so it runs on every backend (CPU, CUDA, Metal).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Iterable

import mlx.core as mx
import numpy as np

from ..errors import GrammarError
from .grammars import Grammar, as_grammar, check

_tables: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()
_tables_lock = threading.Lock()
_BITS = None  # mx.arange(32) as uint32, made on first use


def _tokenizer_json(tokenizer) -> str | None:
    """The tokenizer.json text behind one of our tokenizers, when it has one."""
    rust = getattr(getattr(tokenizer, "_backend", None), "_tok", None)
    if rust is not None and hasattr(rust, "to_str"):
        return rust.to_str()
    return None


def _wrapped(tokenizer):
    """Any tokenizer with `token_bytes`, `encode` and `eos_token_ids`, for llguidance."""
    import llguidance

    class Source:
        eos_token_id = min(tokenizer.eos_token_ids) if tokenizer.eos_token_ids else None
        bos_token_id = getattr(tokenizer, "bos_token_id", None)
        tokens = [tokenizer.token_bytes(i) for i in range(len(tokenizer))]
        special_token_ids = sorted(getattr(getattr(tokenizer, "_backend", None), "special_tokens", {}).values())

        def __call__(self, text):
            text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
            return tokenizer.encode(text, add_special_tokens=False)

    return llguidance.TokenizerWrapper(Source())


def token_table(tokenizer):
    """llguidance's LLTokenizer for `tokenizer`, built on first use and cached."""
    with _tables_lock:
        table = _tables.get(tokenizer)
        if table is not None:
            return table
        import llguidance

        eos = sorted(getattr(tokenizer, "eos_token_ids", None) or [])
        source = _tokenizer_json(tokenizer)
        try:
            if source is not None:
                table = llguidance.LLTokenizer(source, n_vocab=len(tokenizer), eos_token=eos or None)
            else:
                table = llguidance.LLTokenizer(_wrapped(tokenizer), n_vocab=len(tokenizer), eos_token=eos or None)
        except Exception as e:  # the engine rejects a tokenizer it cannot model
            raise GrammarError(f"constrained decoding cannot use this tokenizer: {e}") from None
        _tables[tokenizer] = table
        return table


def apply_bitmask(logits: mx.array, words: np.ndarray) -> mx.array:
    """logits (B, V); words (B, W) int32, bit j of word w allows token 32 w + j -> masked logits."""
    global _BITS
    if _BITS is None:
        _BITS = mx.arange(32, dtype=mx.uint32)
    B, V = logits.shape
    packed = mx.array(words.view(np.uint32))  # (B, W)
    allowed = ((packed[:, :, None] >> _BITS) & 1).reshape(B, -1)  # (B, 32 W)
    n = allowed.shape[1]
    if n > V:
        allowed = allowed[:, :V]
    elif n < V:  # the model's output is wider than the vocabulary: the padding rows are never allowed
        allowed = mx.concatenate([allowed, mx.zeros((B, V - n), dtype=allowed.dtype)], axis=1)
    return mx.where(allowed.astype(mx.bool_), logits, mx.array(-mx.inf, dtype=logits.dtype))


class Constraint:
    """A grammar compiled for one tokenizer; makes a matcher (or a processor) per sequence."""

    def __init__(self, grammar: Grammar, tokenizer):
        self.grammar = grammar
        self.tokenizer = tokenizer
        self.table = token_table(tokenizer)
        check(grammar, self.table)  # with the tokenizer: catches what needs the vocabulary
        self.eos = set(getattr(tokenizer, "eos_token_ids", None) or [])

    def __repr__(self) -> str:
        return f"Constraint({self.grammar.description})"

    def matcher(self):
        import llguidance

        m = llguidance.LLMatcher(self.table, self.grammar.text, log_level=0)
        if m.is_error():
            raise GrammarError(f"invalid {self.grammar.description}: {m.get_error()}")
        return m

    def processor(self) -> "ConstraintProcessor":
        return ConstraintProcessor(self)


class ConstraintProcessor:
    """The logits processor of one sequence (see the module docstring)."""

    def __init__(self, constraint: Constraint):
        self.constraint = constraint
        self.matcher = constraint.matcher()
        self.seen: int | None = None  # history length at the previous call
        self.finished = False  # an EOS went through: nothing left to constrain
        self.bitmask = np.full((1, (constraint.table.vocab_size + 31) // 32), -1, dtype=np.int32)

    def advance(self, tokens: Iterable[int]) -> None:
        """Feeds generated tokens to the matcher (what __call__ does with the new part of the history)."""
        m = self.matcher
        for t in tokens:
            if self.finished:
                return
            if not m.consume_token(int(t)):
                raise GrammarError(f"the output left the {self.constraint.grammar.description}: {m.get_error()}")
            if int(t) in self.constraint.eos:
                self.finished = True

    def forced(self) -> list[int]:
        """Tokens the grammar allows no alternative to, right now (llguidance's fast-forward tokens)."""
        return [] if self.finished else list(self.matcher.compute_ff_tokens())

    @property
    def accepting(self) -> bool:
        return self.finished or self.matcher.is_accepting()

    def mask(self, logits: mx.array) -> mx.array:
        """logits (1, V) or (V,) -> the same with disallowed tokens at -inf."""
        if self.finished:
            return logits
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        if self.matcher.is_error():
            raise GrammarError(f"the {self.constraint.grammar.description} cannot continue: {self.matcher.get_error()}")
        flat = logits.ndim == 1
        out = apply_bitmask(logits[None] if flat else logits, self.bitmask)
        return out[0] if flat else out

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        n = tokens.size
        if self.seen is None:
            self.seen = n  # the first call: the prompt
        elif n > self.seen:
            self.advance(tokens.reshape(-1)[self.seen :].tolist())
            self.seen = n
        return self.mask(logits)


def compile_constraint(tokenizer, kind: str | None, spec: Any = None) -> Constraint:
    """A Constraint for `tokenizer`. kind: "json_schema", "json_object", "regex", "lark", "gbnf",
    "grammar" (Lark or GBNF, by syntax), "choice", or None to read `spec` as a response_format
    (see `as_grammar`). Raises GrammarError with the engine's message."""
    from .grammars import make

    grammar = make(kind, spec) if kind is not None else as_grammar(spec)
    if grammar is None:
        raise GrammarError("no constraint given")
    return Constraint(grammar, tokenizer)


def constraint_for(tokenizer, response_format: Any) -> Constraint | None:
    """`response_format=` of the generation functions -> a Constraint, or None (plain text).
    A Constraint passes through (recompiled when it was made for another tokenizer)."""
    if response_format is None:
        return None
    if isinstance(response_format, Constraint):
        if response_format.tokenizer is not tokenizer:
            return Constraint(response_format.grammar, tokenizer)
        return response_format
    grammar = as_grammar(response_format)
    return None if grammar is None else Constraint(grammar, tokenizer)
