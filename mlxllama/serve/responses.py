"""OpenAI's Responses API, stateless: POST /v1/responses, plain and streamed.

`input` (text or message items) and `instructions` become the messages of a chat request checked
by the chat parser; nothing is stored, so `previous_response_id` is refused with a 400.
Streaming sends response.created, response.in_progress, response.output_item.added,
response.content_part.added, response.output_text.delta..., response.output_text.done,
response.content_part.done, response.output_item.done, response.completed.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from .engine import Delta, Done
from .schemas import APIError, Parsed, bad, parse_chat, text_content

TEXT_PARTS = ("input_text", "output_text", "text")


def messages(body: dict) -> list[dict[str, str]]:
    out = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise bad("instructions", "'instructions' must be a string", "invalid_type")
        out.append({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        return out + [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise bad("input", "'input' must be a string or a non-empty list of items",
                  "missing" if items is None else "invalid_type")
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad(where, f"'{where}' must be an object", "invalid_type")
        if item.get("type", "message") != "message":
            raise bad(f"{where}.type", f"input items of type {str(item.get('type'))[:40]!r} are not supported "
                      "(only messages)", "unsupported_parameter")
        if "content" not in item:
            raise bad(f"{where}.content", f"'{where}.content' is required", "missing")
        out.append({"role": item.get("role"), "content": text_content(item["content"], f"{where}.content", TEXT_PARTS)})
    return out


def response_format(text: Any) -> dict[str, Any] | None:
    """`text.format` -> the chat request's response_format (None: plain text)."""
    if text is None:
        return None
    fmt = text.get("format") if isinstance(text, dict) else None
    if not isinstance(text, dict) or (fmt is not None and not isinstance(fmt, dict)):
        raise bad("text.format", "'text.format' must be an object with a 'type'", "invalid_type")
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}}
    return {"type": fmt.get("type")}  # json_object, or a type the chat parser refuses


def parse(body: Any, served) -> Parsed:
    if not isinstance(body, dict):
        raise bad(None, "the request body must be a JSON object", "invalid_json")
    if body.get("previous_response_id") is not None:
        raise bad("previous_response_id", "this server stores no responses: send the whole conversation in "
                  "'input' instead of 'previous_response_id'", "unsupported_parameter")
    if body.get("conversation") is not None:
        raise bad("conversation", "this server stores no conversations: send the whole conversation in 'input'",
                  "unsupported_parameter")
    if body.get("tools"):
        raise bad("tools", "tools are not supported by this server", "unsupported_parameter")
    chat = {k: body[k] for k in ("model", "temperature", "top_p", "stream") if k in body}
    fmt = response_format(body.get("text"))
    if fmt is not None:
        chat["response_format"] = fmt
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    try:
        return parse_chat({**chat, "messages": messages(body)}, served)
    except APIError as e:  # name the field as this API calls it
        e.param = {"max_tokens": "max_output_tokens", "response_format": "text.format"}.get(e.param, e.param)
        raise


def sse(event: dict[str, Any]) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


class Responses:
    """The handlers; `h` is the app's Handlers (key check, body reading, the engine)."""

    def __init__(self, h):
        self.h = h

    def _object(self, rid: str, parsed: Parsed, body: dict, status: str, output: list, done: Done | None) -> dict:
        usage = None
        if done is not None:
            usage = {"input_tokens": done.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                     "output_tokens": done.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": done.prompt_tokens + done.completion_tokens}
        return {
            "id": rid, "object": "response", "created_at": int(time.time()), "status": status, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "model": parsed.model or self.h.settings.model_id, "output": output, "parallel_tool_calls": False,
            "previous_response_id": None, "reasoning": {"effort": None, "summary": None}, "store": False,
            "temperature": parsed.temperature if parsed.temperature is not None else self.h.settings.default_temperature,
            "text": {"format": (body.get("text") or {}).get("format") or {"type": "text"}}, "tool_choice": "none", "tools": [], "top_p": parsed.top_p,
            "truncation": "disabled", "usage": usage, "metadata": body.get("metadata") or {},
        }

    @staticmethod
    def _message(mid: str, text: str | None, status: str) -> dict:
        content = [] if text is None else [{"type": "output_text", "text": text, "annotations": []}]
        return {"type": "message", "id": mid, "status": status, "role": "assistant", "content": content}

    async def create(self, request: Request) -> Response:
        self.h.check_key(request)
        body = await self.h.read_json(request)
        parsed = parse(body, self.h.settings.names)
        run = await self.h.start(request, parsed)
        rid, mid = "resp_" + uuid.uuid4().hex[:24], "msg_" + uuid.uuid4().hex[:24]
        if parsed.stream:
            return StreamingResponse(self.stream(run, rid, mid, parsed, body), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            (choice,) = await run.collect()
        finally:
            run.close()
        status = "incomplete" if choice.done.finish_reason == "length" else "completed"
        return JSONResponse(self._object(rid, parsed, body, status, [self._message(mid, choice.text, "completed")],
                                         choice.done))

    async def stream(self, run, rid: str, mid: str, parsed: Parsed, body: dict) -> AsyncIterator[str]:
        seq = 0

        def event(kind: str, **fields) -> str:
            nonlocal seq
            seq += 1
            return sse({"type": kind, "sequence_number": seq - 1, **fields})

        where = {"item_id": mid, "output_index": 0, "content_index": 0}
        try:
            yield event("response.created", response=self._object(rid, parsed, body, "in_progress", [], None))
            yield event("response.in_progress", response=self._object(rid, parsed, body, "in_progress", [], None))
            yield event("response.output_item.added", output_index=0, item=self._message(mid, None, "in_progress"))
            yield event("response.content_part.added", **where,
                        part={"type": "output_text", "text": "", "annotations": []})
            text = ""
            async for _, e in run.events():
                if isinstance(e, Delta):
                    if e.text:
                        text += e.text
                        yield event("response.output_text.delta", **where, delta=e.text, logprobs=[])
                elif isinstance(e, Done):
                    part = {"type": "output_text", "text": text, "annotations": []}
                    yield event("response.output_text.done", **where, text=text, logprobs=[])
                    yield event("response.content_part.done", **where, part=part)
                    item = self._message(mid, text, "completed")
                    yield event("response.output_item.done", output_index=0, item=item)
                    status = "incomplete" if e.finish_reason == "length" else "completed"
                    yield event(f"response.{status}", response=self._object(rid, parsed, body, status, [item], e))
                else:
                    yield event("error", code="generation_failed", message=e.message, param=None)
                    return
        finally:
            run.close()
