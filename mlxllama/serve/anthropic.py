"""Anthropic's Messages API: POST /v1/messages (plain and streamed) and /v1/messages/count_tokens.

A request becomes the same `Parsed` chat request the OpenAI routes make; errors are answered in
Anthropic's shape {"type": "error", "error": {"type", "message"}}.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, AsyncIterator

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from .engine import Delta, Done
from .prompts import prompt_tokens
from .schemas import APIError, Parsed, bad, bool_field, int_field, model_names, number_field, text_content

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
               429: "rate_limit_error", 500: "api_error", 503: "overloaded_error"}
MAX_STOP_SEQUENCES = 16


def error_body(e: APIError) -> dict[str, Any]:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(e.status, "api_error"), "message": e.message}}


def messages(body: dict) -> list[dict[str, str]]:
    """system + messages -> chat-template messages."""
    out = []
    if body.get("system") is not None:
        out.append({"role": "system", "content": text_content(body["system"], "system")})
    items = body.get("messages")
    if not isinstance(items, list) or not items:
        raise bad("messages", "'messages' must be a non-empty list", "missing" if items is None else "invalid_type")
    for i, m in enumerate(items):
        if not isinstance(m, dict):
            raise bad(f"messages.{i}", f"'messages.{i}' must be an object", "invalid_type")
        if m.get("role") not in ("user", "assistant"):
            raise bad(f"messages.{i}.role", f"'messages.{i}.role' must be 'user' or 'assistant', got {m.get('role')!r}")
        if "content" not in m:
            raise bad(f"messages.{i}.content", f"'messages.{i}.content' is required", "missing")
        out.append({"role": m["role"], "content": text_content(m["content"], f"messages.{i}.content")})
    return out


def parse(body: Any, served) -> Parsed:
    if not isinstance(body, dict):
        raise bad(None, "the request body must be a JSON object", "invalid_json")
    names = model_names(served)
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or model not in names):
        raise APIError(404, f"model: {str(model)[:200]} (this server serves {names})", param="model")
    if body.get("tools"):
        raise bad("tools", "tool use is not supported by this server", "unsupported_parameter")
    output = body.get("output_config")
    if output is not None and (not isinstance(output, dict) or output.get("format") is not None):
        raise bad("output_config", "'output_config.format' (structured output) is not supported by this server",
                  "unsupported_parameter")
    stops = body.get("stop_sequences")
    if stops is not None and not (isinstance(stops, list) and all(isinstance(s, str) for s in stops)):
        raise bad("stop_sequences", "'stop_sequences' must be a list of strings", "invalid_type")
    if stops and len(stops) > MAX_STOP_SEQUENCES:
        raise bad("stop_sequences", f"at most {MAX_STOP_SEQUENCES} stop sequences")
    max_tokens = int_field(body, "max_tokens", 1)
    if max_tokens is None:
        raise bad("max_tokens", "'max_tokens' is required", "missing")
    return Parsed(
        kind="chat", messages=messages(body), max_tokens=max_tokens,
        temperature=number_field(body, "temperature", None, 0.0, 1.0),
        top_p=number_field(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=int_field(body, "top_k", 0) or 0,
        stop=[s for s in stops or [] if s], stream=bool_field(body, "stream"),
        model=model if isinstance(model, str) and model in names.names else names.primary,
    )


def stop_reason(done: Done) -> str:
    if done.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if done.stop_sequence is not None else "end_turn"


def sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


class Messages:
    """The handlers; `h` is the app's Handlers (key check, body reading, the engine)."""

    def __init__(self, h):
        self.h = h

    async def create(self, request: Request) -> Response:
        self.h.check_key(request)
        parsed = parse(await self.h.read_json(request), self.h.settings.names)
        run = await self.h.start(request, parsed)
        msg_id = "msg_" + uuid.uuid4().hex[:24]
        if parsed.stream:
            return StreamingResponse(self.stream(run, msg_id, parsed.model), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            (choice,) = await run.collect()
        finally:
            run.close()
        done = choice.done
        return JSONResponse({
            "id": msg_id, "type": "message", "role": "assistant", "model": parsed.model,
            "content": [{"type": "text", "text": choice.text}],
            "stop_reason": stop_reason(done), "stop_sequence": done.stop_sequence,
            "usage": {"input_tokens": done.prompt_tokens, "output_tokens": done.completion_tokens},
        })

    async def stream(self, run, msg_id: str, model: str) -> AsyncIterator[str]:
        try:
            n_prompt = len(run.jobs[0].request.prompt)
            yield sse("message_start", {"type": "message_start", "message": {
                "id": msg_id, "type": "message", "role": "assistant", "model": model, "content": [],
                "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": n_prompt, "output_tokens": 0}}})
            yield sse("content_block_start", {"type": "content_block_start", "index": 0,
                                              "content_block": {"type": "text", "text": ""}})
            yield sse("ping", {"type": "ping"})
            async for _, event in run.events():
                if isinstance(event, Delta):
                    if event.text:
                        yield sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                          "delta": {"type": "text_delta", "text": event.text}})
                elif isinstance(event, Done):
                    yield sse("content_block_stop", {"type": "content_block_stop", "index": 0})
                    yield sse("message_delta", {"type": "message_delta",
                                                "delta": {"stop_reason": stop_reason(event),
                                                          "stop_sequence": event.stop_sequence},
                                                "usage": {"output_tokens": event.completion_tokens}})
                    yield sse("message_stop", {"type": "message_stop"})
                else:
                    yield sse("error", error_body(APIError(500, event.message)))
                    return
        finally:
            run.close()

    async def count_tokens(self, request: Request) -> Response:
        self.h.check_key(request)
        body = await self.h.read_json(request)
        if not isinstance(body, dict):
            raise bad(None, "the request body must be a JSON object", "invalid_json")
        if body.get("tools"):
            raise bad("tools", "tool use is not supported by this server", "unsupported_parameter")
        parsed = Parsed(kind="chat", messages=messages(body))
        vocab = getattr(getattr(self.h.model, "args", None), "vocab_size", None) or len(self.h.tokenizer)
        tokens = await run_in_threadpool(prompt_tokens, parsed, self.h.tokenizer, vocab)
        return JSONResponse({"input_tokens": len(tokens)})
