"""Response bodies and stream chunks in the OpenAI formats (chat.completion, text_completion)."""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

from .engine import Done, TokenLogprob


IMPOSSIBLE = -9999.0  # OpenAI's logprob for a token of probability zero (JSON has no -Infinity)


def finite(logprob: float) -> float:
    """A log probability JSON can carry: -inf (a masked token) and NaN become IMPOSSIBLE."""
    return logprob if math.isfinite(logprob) else IMPOSSIBLE


def usage(done: Done | list[Done]) -> dict[str, Any]:
    """Usage of a request: its prompt once, the tokens of all its choices."""
    dones = done if isinstance(done, list) else [done]
    prompt, completion = dones[0].prompt_tokens, sum(d.completion_tokens for d in dones)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": dones[0].cached_tokens}}


class Formatter:
    """Builds the bodies of one response; `kind` is "chat" or "completion"."""

    def __init__(self, kind: str, model_id: str, tokenizer, logprobs: int | None,
                 tools: list[dict[str, Any]] | None = None):
        self.kind, self.model_id, self.tokenizer, self.k = kind, model_id, tokenizer, logprobs
        self.tools = tools  # chat with tools offered: calls in the output become `tool_calls`
        self.tool_format = None
        if tools:
            from ..tools import detect_format

            self.tool_format = detect_format(tokenizer)
        prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
        self.id = prefix + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.text_offset: dict[int, int] = {}  # completions: where each choice's next token starts in its text

    def _head(self, chunk: bool) -> dict[str, Any]:
        obj = ("chat.completion.chunk" if chunk else "chat.completion") if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_id,
                "system_fingerprint": None}

    # -- logprobs ------------------------------------------------------------------------------

    def _token(self, token: int) -> tuple[str, list[int]]:
        data = self.tokenizer.token_bytes(token)
        return data.decode("utf-8", errors="replace"), list(data)

    def logprobs(self, items: list[TokenLogprob], index: int = 0) -> dict[str, Any] | None:
        if self.k is None:
            return None
        if self.kind == "chat":
            content = []
            for it in items:
                text, data = self._token(it.token)
                top = [dict(zip(("token", "bytes"), self._token(t)), logprob=finite(lp)) for t, lp in it.top]
                content.append({"token": text, "logprob": finite(it.logprob), "bytes": data, "top_logprobs": top})
            return {"content": content, "refusal": None}
        tokens, offsets = [], []
        for it in items:
            text = self._token(it.token)[0]
            tokens.append(text)
            offsets.append(self.text_offset.get(index, 0))
            self.text_offset[index] = offsets[-1] + len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [finite(it.logprob) for it in items],
            "top_logprobs": [{self._token(t)[0]: finite(lp) for t, lp in it.top} for it in items],
            "text_offset": offsets,
        }

    # -- whole responses -------------------------------------------------------------------------

    def call_stream(self):
        """A mlxllama.tools.CallStream for a streamed chat with tools, else None (one per choice)."""
        from ..tools import CallStream

        return CallStream(self.tool_format, self.tools) if self.tools else None

    def response(self, choices: list[tuple[str, list[TokenLogprob], Done]]) -> dict[str, Any]:
        """choices: (text, logprobs, Done) of every choice, in index order."""
        out = []
        for i, (text, items, done) in enumerate(choices):
            if self.kind == "chat":
                message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
                reason = done.finish_reason
                if self.tools:
                    from ..tools import parse_calls

                    content, calls = parse_calls(text, self.tool_format, self.tools)
                    if calls:
                        message["content"] = content or None
                        message["tool_calls"] = [c.openai() for c in calls]
                        reason = "tool_calls"
                out.append({"index": i, "message": message, "logprobs": self.logprobs(items, i),
                            "finish_reason": reason})
            else:
                out.append({"index": i, "text": text, "logprobs": self.logprobs(items, i),
                            "finish_reason": done.finish_reason})
        return {**self._head(False), "choices": out, "usage": usage([c[2] for c in choices])}

    # -- stream chunks ---------------------------------------------------------------------------

    def chunk(self, text: str | None, items: list[TokenLogprob], finish_reason: str | None = None,
              role: bool = False, with_usage_field: bool = False, index: int = 0,
              tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        if self.kind == "chat":
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            if tool_calls:
                delta["tool_calls"] = tool_calls
            choice = {"index": index, "delta": delta, "logprobs": self.logprobs(items, index) if items else None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": self.logprobs(items, index) if items else None,
                      "finish_reason": finish_reason}
        body = {**self._head(True), "choices": [choice]}
        if with_usage_field:
            body["usage"] = None
        return body

    def call_chunks(self, calls, with_usage_field: bool = False, index: int = 0) -> list[dict[str, Any]]:
        """Stream chunks for finished calls of choice `index`: the id and name first, then the arguments."""
        out = []
        for i, call in enumerate(calls):
            entry = call.openai(i)
            head = {**entry, "function": {"name": entry["function"]["name"], "arguments": ""}}
            out.append(self.chunk(None, [], with_usage_field=with_usage_field, index=index, tool_calls=[head]))
            args = {"index": i, "function": {"arguments": entry["function"]["arguments"]}}
            out.append(self.chunk(None, [], with_usage_field=with_usage_field, index=index, tool_calls=[args]))
        return out

    def usage_chunk(self, done: Done | list[Done]) -> dict[str, Any]:
        return {**self._head(True), "choices": [], "usage": usage(done)}
