"""Extractive answers: a decoding constraint that keeps the generated text a contiguous span of the
context, whatever tokens the model uses to spell it.

Matching is on bytes (`tokenizer.token_bytes`), not token ids, so a span may be tokenized
differently from the context: "Paris" without the space the context has before it, punctuation
glued to a word, a Chinese character split across tokens. The state is the set of byte positions
in the context where the text generated so far ends; a token is allowed when its bytes continue
the text at one of them. A span starts at a character boundary and not inside an ASCII word, and
may end (EOS) only on a character boundary and not inside an ASCII word either.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

SEPARATOR = b"\xff"  # never in UTF-8 text: chunks are joined with it so no span crosses two
_ALNUM = np.zeros(256, dtype=bool)
for _c in b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz":
    _ALNUM[_c] = True


class TokenTable:
    """The ordinary tokens of a vocabulary by their bytes, and every prefix of those bytes."""

    def __init__(self, tokenizer):
        special = set(getattr(getattr(tokenizer, "_backend", None), "special_tokens", {}).values())
        special |= set(tokenizer.eos_token_ids)
        special |= {i for i in (tokenizer.bos_token_id, tokenizer.pad_token_id) if i is not None}
        self.by_bytes: dict[bytes, list[int]] = {}
        self.prefixes: set[bytes] = set()
        for i in range(len(tokenizer)):
            if i in special:
                continue
            data = tokenizer.token_bytes(i)
            if not data or SEPARATOR in data:
                continue
            self.by_bytes.setdefault(data, []).append(i)
        for data in self.by_bytes:
            for k in range(1, len(data) + 1):
                self.prefixes.add(data[:k])


_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def token_table(tokenizer) -> TokenTable:
    """Built once per tokenizer (about a second for a 50k vocabulary)."""
    table = _TABLES.get(tokenizer)
    if table is None:
        table = _TABLES[tokenizer] = TokenTable(tokenizer)
    return table


@dataclass
class Span:
    chunk: int  # index into the texts the constraint was built from
    start: int  # character offsets in that text
    end: int
    text: str


def masked(data: bytes, text: str | None) -> bytes:
    """`data` with every occurrence of `text` (ASCII case ignored) overwritten by SEPARATOR bytes,
    so no span holds it, and offsets stay the same."""
    needle = " ".join((text or "").split()).encode("utf-8").lower()
    if not needle:
        return data
    lower, out = data.lower(), bytearray(data)
    i = lower.find(needle)
    while i >= 0:
        out[i : i + len(needle)] = SEPARATOR * len(needle)
        i = lower.find(needle, i + len(needle))
    return bytes(out)


class SpanContext:
    """The context side of the constraint, shared by every question about the same texts; text
    equal to `exclude` (the question, where the documents quote it) is never part of a span."""

    def __init__(self, tokenizer, texts: list[str], exclude: str | None = None):
        self.table = token_table(tokenizer)
        self.texts = texts
        self.encoded = [t.encode("utf-8") for t in texts]
        self.data = masked(SEPARATOR.join(self.encoded), exclude)
        self.bases = np.cumsum([0] + [len(b) + 1 for b in self.encoded])[:-1]  # byte start of each text
        arr = np.frombuffer(self.data, dtype=np.uint8)
        boundary = ((arr & 0xC0) != 0x80) & (arr != 0xFF)
        prev_alnum = np.concatenate([[False], _ALNUM[arr[:-1]]])
        ok = boundary & ~(prev_alnum & _ALNUM[arr])
        for base, data in zip(self.bases, self.encoded):  # nothing but whitespace after: no start
            ok[base + len(data.rstrip()) :] = False
        self.starts = np.nonzero(ok)[0]
        self._first: list[int] | None = None
        self._start_set: set[int] | None = None

    def next_tokens(self, positions) -> set[int]:
        """Tokens whose bytes continue the context at one of `positions`."""
        data, prefixes, by_bytes = self.data, self.table.prefixes, self.table.by_bytes
        allowed: set[int] = set()
        seen: set[bytes] = set()
        for p in positions:
            k = p + 1
            piece = data[p:k]
            while piece in prefixes and k <= len(data):
                if piece in by_bytes and piece not in seen:
                    seen.add(piece)
                    allowed.update(by_bytes[piece])
                k += 1
                piece = data[p:k]
        return allowed

    def first_tokens(self) -> list[int]:
        if self._first is None:
            self._first = sorted(self.next_tokens(self.starts.tolist()))
        return self._first

    def can_end(self, p: int) -> bool:
        """Whether a span may end before byte p: on a character boundary, not inside an ASCII word."""
        data = self.data
        if p >= len(data) or data[p] == 0xFF:
            return True
        return (data[p] & 0xC0) != 0x80 and not (_ALNUM[data[p - 1]] and _ALNUM[data[p]])

    def locate(self, span: bytes, ends: bool = False) -> Span | None:
        """The first place the span occurs at a valid start (and, with `ends`, a valid end too);
        whitespace around it is trimmed."""
        if self._start_set is None:
            self._start_set = set(self.starts.tolist())
        starts = self._start_set
        i = self.data.find(span)
        while i >= 0 and (i not in starts or (ends and not self.can_end(i + len(span)))):
            i = self.data.find(span, i + 1)
        if i < 0 or not span:
            return None
        chunk = int(np.searchsorted(self.bases, i, side="right") - 1)
        local = i - int(self.bases[chunk])
        raw = self.encoded[chunk][local : local + len(span)]
        text = raw.decode("utf-8", errors="ignore")
        start = len(self.encoded[chunk][:local].decode("utf-8", errors="ignore"))
        lead = len(text) - len(text.lstrip())
        stripped = text.strip()
        if not stripped:
            return None
        return Span(chunk, start + lead, start + lead + len(stripped), stripped)


    def find(self, text: str) -> Span | None:
        """The first occurrence of `text` in the texts, ignoring case and how whitespace is spelt,
        that begins and ends where a span may (not inside an ASCII word, not in excluded text)."""
        words = text.split()
        if not words:
            return None
        lead = r"(?<![A-Za-z0-9])" if words[0][0].isascii() and words[0][0].isalnum() else ""
        trail = r"(?![A-Za-z0-9])" if words[-1][-1].isascii() and words[-1][-1].isalnum() else ""
        pattern = re.compile(lead + r"\s+".join(map(re.escape, words)) + trail, re.IGNORECASE)
        for i, t in enumerate(self.texts):
            for m in pattern.finditer(t):
                base = int(self.bases[i]) + len(t[: m.start()].encode("utf-8"))
                if SEPARATOR not in self.data[base : base + len(m.group().encode("utf-8"))]:
                    return Span(i, m.start(), m.end(), m.group())
        return None


class SpanConstraint:
    """A logits processor `(tokens, logits) -> logits` for one answer. It also keeps each step's
    unconstrained log-probabilities, which score the span against the no-answer option."""

    def __init__(self, context: SpanContext, tokenizer, ban_first: int | None = None):
        self.context, self.ban_first = context, ban_first
        self.token_bytes = tokenizer.token_bytes
        self.eos_ids = sorted(tokenizer.eos_token_ids)
        self.positions: list[int] | None = None  # None: nothing generated yet
        self.generated = bytearray()
        self.raw_logprobs: list[mx.array] = []  # (V,) per step, before the mask
        self._seen: int | None = None

    def advance(self, token: int) -> None:
        data = self.token_bytes(token)
        if token in self.eos_ids or not data:
            return
        starts = self.context.starts.tolist() if self.positions is None else self.positions
        text = self.context.data
        self.positions = [p + len(data) for p in starts if text.startswith(data, p)]
        self.generated += data

    def allowed(self) -> list[int]:
        if self.positions is None:
            ids = [i for i in self.context.first_tokens() if i != self.ban_first]
        else:
            ids = list(self.context.next_tokens(self.positions))
            if self.generated.strip() and any(self.context.can_end(p) for p in self.positions):
                ids += self.eos_ids
        return ids or self.eos_ids

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        n = tokens.size
        if self._seen is None:
            self._seen = n
        elif n > self._seen:
            for t in tokens[self._seen :].tolist():
                self.advance(int(t))
            self._seen = n
        self.raw_logprobs.append((logits - mx.logsumexp(logits, axis=-1, keepdims=True)).reshape(-1))
        mask = np.full(logits.shape[-1], -np.inf, dtype=np.float32)
        ids = np.asarray(self.allowed(), dtype=np.int64)
        mask[ids[ids < logits.shape[-1]]] = 0.0
        return logits + mx.array(mask).astype(logits.dtype)

    def raw_logprob(self, step: int, token: int) -> float:
        return float(self.raw_logprobs[step][token].item())
