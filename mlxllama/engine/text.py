"""Tokens -> text for one sequence: the streaming detokenizer, stop strings, EOS and max tokens.

`TextStream.add(token)` returns (text delta, finish reason or None); stream_generate, the batched
engine and the server all turn tokens into text through it, so they agree on every boundary case
(a stop string split across tokens, text held back that may begin one, EOS, the last token).
"""

from __future__ import annotations

from typing import Sequence


class StopMatcher:
    """Finds stop strings across token boundaries and holds back text that may begin one."""

    def __init__(self, stops: Sequence[str] | None):
        self.stops = [s for s in (stops or []) if s]
        self.text = ""  # generated text so far
        self.emitted = 0  # how much of it was handed out

    def feed(self, segment: str) -> tuple[str, bool]:
        """Adds text; returns (text safe to emit now, whether a stop string was found)."""
        self.text += segment
        if not self.stops:
            out, self.emitted = self.text[self.emitted :], len(self.text)
            return out, False
        start = max(0, self.emitted - max(map(len, self.stops)))
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            out = self.text[self.emitted : end] if end > self.emitted else ""
            self.emitted = max(self.emitted, end)
            return out, True
        hold = self._partial_suffix()
        end = max(self.emitted, len(self.text) - hold)
        out, self.emitted = self.text[self.emitted : end], end
        return out, False

    def _partial_suffix(self) -> int:
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    best = max(best, k)
                    break
        return best

    def flush(self) -> str:
        out, self.emitted = self.text[self.emitted :], len(self.text)
        return out


class TextStream:
    """One sequence's text: feed generated tokens, get text deltas and the finish reason
    ("stop" for EOS or a stop string, "length" at max_tokens)."""

    def __init__(self, tokenizer, stop: Sequence[str] | None = None, max_tokens: int | None = None,
                 eos: set[int] | None = None):
        self.detok = tokenizer.detokenizer
        self.matcher = StopMatcher(stop)
        self.eos = set(tokenizer.eos_token_ids) if eos is None else eos
        self.max_tokens = max_tokens
        self.n = 0  # tokens accepted
        self.finish_reason: str | None = None

    def add(self, token: int) -> tuple[str, str | None]:
        self.n += 1
        if token in self.eos:
            self.detok.finalize()
            text, _ = self.matcher.feed(self.detok.last_segment)
            return self._finish(text + self.matcher.flush(), "stop")
        self.detok.add_token(token)
        text, stopped = self.matcher.feed(self.detok.last_segment)
        if stopped:
            return self._finish(text, "stop")
        if self.max_tokens is not None and self.n >= self.max_tokens:
            self.detok.finalize()
            more, stopped = self.matcher.feed(self.detok.last_segment)
            text += more
            return self._finish(text + ("" if stopped else self.matcher.flush()), "stop" if stopped else "length")
        return text, None

    def _finish(self, text: str, reason: str) -> tuple[str, str]:
        self.finish_reason = reason
        return text, reason
