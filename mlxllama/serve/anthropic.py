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
from .schemas import APIError, Parsed, bad, bool_field, int_field, model_names, number_field, parse_chat, text_content

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
               429: "rate_limit_error", 500: "api_error", 503: "overloaded_error"}
MAX_STOP_SEQUENCES = 16


def error_body(e: APIError) -> dict[str, Any]:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(e.status, "api_error"), "message": e.message}}


def _tool_use(block: dict, where: str) -> dict[str, Any]:
    if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
        raise bad(where, f"'{where}' needs an 'id' and a 'name'", "missing")
    return {"id": block["id"], "type": "function",
            "function": {"name": block["name"], "arguments": json.dumps(block.get("input") or {}, ensure_ascii=False)}}


def _turn(m: Any, i: int) -> list[dict[str, Any]]:
    """One Anthropic message -> OpenAI-shaped chat messages: tool_use blocks become the assistant's
    `tool_calls`, tool_result blocks become `tool` messages (before the user's text)."""
    where = f"messages.{i}"
    if not isinstance(m, dict):
        raise bad(where, f"'{where}' must be an object", "invalid_type")
    role = m.get("role")
    if role not in ("user", "assistant"):
        raise bad(f"{where}.role", f"'{where}.role' must be 'user' or 'assistant', got {role!r}")
    if "content" not in m:
        raise bad(f"{where}.content", f"'{where}.content' is required", "missing")
    content = m["content"]
    if not isinstance(content, list):
        return [{"role": role, "content": text_content(content, f"{where}.content")}]
    texts, calls, results = [], [], []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        at = f"{where}.content.{j}"
        if kind == "tool_use" and role == "assistant":
            calls.append(_tool_use(block, at))
        elif kind == "tool_result" and role == "user":
            if not isinstance(block.get("tool_use_id"), str):
                raise bad(at, f"'{at}.tool_use_id' is required", "missing")
            result = block.get("content", "")
            text = text_content(result, f"{at}.content") if result is not None else ""
            results.append({"role": "tool", "tool_call_id": block["tool_use_id"],
                            "content": ("Error: " + text) if block.get("is_error") else text})
        elif kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        else:
            raise bad(at, f"content blocks of type {str(kind)[:40]!r} are not supported here (text, tool_use in "
                      "assistant turns, tool_result in user turns)", "unsupported_parameter")
    out = results
    if role == "assistant":
        out = out + [{"role": "assistant", "content": "".join(texts), **({"tool_calls": calls} if calls else {})}]
    elif texts or not results:
        out = out + [{"role": "user", "content": "".join(texts)}]
    return out


def _tools(body: dict) -> dict[str, Any]:
    """tools, tool_choice -> the OpenAI chat fields (checked there)."""
    out: dict[str, Any] = {}
    tools = body.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise bad("tools", "'tools' must be a list", "invalid_type")
        converted = []
        for j, t in enumerate(tools):
            if not isinstance(t, dict) or t.get("type", "custom") != "custom" or not isinstance(t.get("name"), str):
                raise bad(f"tools.{j}", "only client tools ({\"name\", \"description\", \"input_schema\"}) are "
                          "supported", "unsupported_parameter")
            fn = {"name": t["name"], "parameters": t.get("input_schema") or {"type": "object"}}
            if isinstance(t.get("description"), str):
                fn["description"] = t["description"]
            converted.append({"type": "function", "function": fn})
        out["tools"] = converted
    choice = body.get("tool_choice")
    if choice is not None:
        kind = choice.get("type") if isinstance(choice, dict) else None
        if kind not in ("auto", "any", "tool", "none"):
            raise bad("tool_choice", "'tool_choice.type' must be auto, any, tool or none")
        out["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(kind) or {
            "type": "function", "function": {"name": choice.get("name")}}
        if choice.get("disable_parallel_tool_use"):
            out["parallel_tool_calls"] = False
    return out


def chat_body(body: Any) -> dict[str, Any]:
    """An Anthropic request -> the OpenAI chat request it means (sampling fields checked here)."""
    if not isinstance(body, dict):
        raise bad(None, "the request body must be a JSON object", "invalid_json")
    output = body.get("output_config")
    fmt = output.get("format") if isinstance(output, dict) else None
    if output is not None and (not isinstance(output, dict) or not (fmt is None or isinstance(fmt, dict)
                                                                   and fmt.get("type") == "json_schema")):
        raise bad("output_config", "'output_config.format' must be {\"type\": \"json_schema\", \"schema\": ...}")
    messages = []
    if body.get("system") is not None:
        messages.append({"role": "system", "content": text_content(body["system"], "system")})
    items = body.get("messages")
    if not isinstance(items, list) or not items:
        raise bad("messages", "'messages' must be a non-empty list", "missing" if items is None else "invalid_type")
    for i, m in enumerate(items):
        messages.extend(_turn(m, i))
    chat = {"messages": messages, "stream": bool_field(body, "stream"), **_tools(body)}
    if fmt is not None:
        chat["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt.get("schema")}}
    temperature = number_field(body, "temperature", None, 0.0, 1.0)  # Anthropic's range
    if temperature is not None:
        chat["temperature"] = temperature
    for name in ("top_p", "top_k"):
        if body.get(name) is not None:
            chat[name] = body[name]
    return chat


def parse(body: Any, served) -> Parsed:
    names = model_names(served)
    model = body.get("model") if isinstance(body, dict) else None
    if model is not None and (not isinstance(model, str) or model not in names):
        raise APIError(404, f"model: {str(model)[:200]} (this server serves {names})", param="model")
    chat = chat_body(body)
    stops = body.get("stop_sequences")
    if stops is not None and not (isinstance(stops, list) and all(isinstance(s, str) for s in stops)):
        raise bad("stop_sequences", "'stop_sequences' must be a list of strings", "invalid_type")
    if stops and len(stops) > MAX_STOP_SEQUENCES:
        raise bad("stop_sequences", f"at most {MAX_STOP_SEQUENCES} stop sequences")
    max_tokens = int_field(body, "max_tokens", 1)
    if max_tokens is None:
        raise bad("max_tokens", "'max_tokens' is required", "missing")
    try:
        parsed = parse_chat({**chat, "max_tokens": max_tokens, **({"model": model} if model else {})}, names)
    except APIError as e:  # name the field as this API calls it
        e.param = {"response_format": "output_config", "stop": "stop_sequences"}.get(e.param, e.param)
        raise
    parsed.stop = [s for s in stops or [] if s]
    parsed.model = parsed.model or names.primary
    return parsed


def tools_of(parsed: Parsed) -> list[dict[str, Any]] | None:
    """The tools offered to the model (none when tool_choice is none)."""
    tools = getattr(parsed, "tools", None)
    return tools if tools and getattr(parsed, "tool_choice", "auto") != "none" else None


def content_blocks(text: str, parsed: Parsed, tokenizer) -> tuple[list[dict[str, Any]], bool]:
    """The answer as Anthropic content blocks; whether it calls tools."""
    tools = tools_of(parsed)
    if tools:
        from ..tools import detect_format, parse_calls

        text, calls = parse_calls(text, detect_format(tokenizer), tools)
        if calls:
            blocks = [{"type": "text", "text": text}] if text else []
            return blocks + [tool_use_block(c) for c in calls], True
    return [{"type": "text", "text": text}], False


def tool_use_block(call) -> dict[str, Any]:
    return {"type": "tool_use", "id": "toolu_" + call.id.removeprefix("call_"), "name": call.name,
            "input": call.arguments}


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
            return StreamingResponse(self.stream(run, msg_id, parsed), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            (choice,) = await run.collect()
        finally:
            run.close()
        done = choice.done
        blocks, called = content_blocks(choice.text, parsed, self.h.tokenizer)
        return JSONResponse({
            "id": msg_id, "type": "message", "role": "assistant", "model": parsed.model, "content": blocks,
            "stop_reason": "tool_use" if called else stop_reason(done), "stop_sequence": done.stop_sequence,
            "usage": {"input_tokens": done.prompt_tokens, "output_tokens": done.completion_tokens},
        })

    async def stream(self, run, msg_id: str, parsed: Parsed) -> AsyncIterator[str]:
        """Text streams as it comes; with tools, text that may be a call is held back and finished
        calls follow as tool_use blocks (their input as one input_json_delta)."""
        tools = tools_of(parsed)
        calls = None
        if tools:
            from ..tools import CallStream, detect_format

            calls = CallStream(detect_format(self.h.tokenizer), tools)
        index, text_open = 0, False

        def text(t: str):
            nonlocal text_open
            if not text_open:
                text_open = True
                yield sse("content_block_start", {"type": "content_block_start", "index": index,
                                                  "content_block": {"type": "text", "text": ""}})
            if t:
                yield sse("content_block_delta", {"type": "content_block_delta", "index": index,
                                                  "delta": {"type": "text_delta", "text": t}})

        try:
            yield sse("message_start", {"type": "message_start", "message": {
                "id": msg_id, "type": "message", "role": "assistant", "model": parsed.model, "content": [],
                "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": len(run.jobs[0].request.prompt), "output_tokens": 0}}})
            if calls is None:
                for chunk in text(""):  # the text block opens at once, as Anthropic's does
                    yield chunk
            yield sse("ping", {"type": "ping"})
            async for _, event in run.events():
                if isinstance(event, Delta):
                    shown = calls.feed(event.text) if calls is not None else event.text
                    if shown:
                        for chunk in text(shown):
                            yield chunk
                elif isinstance(event, Done):
                    found = []
                    if calls is not None:
                        rest, found = calls.finish()
                        if rest:
                            for chunk in text(rest):
                                yield chunk
                    if text_open or not found:
                        if not text_open:
                            for chunk in text(""):
                                yield chunk
                        yield sse("content_block_stop", {"type": "content_block_stop", "index": index})
                        index += 1
                    for call in found:
                        block = tool_use_block(call)
                        yield sse("content_block_start", {"type": "content_block_start", "index": index,
                                                          "content_block": {**block, "input": {}}})
                        yield sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": {
                            "type": "input_json_delta", "partial_json": json.dumps(block["input"], ensure_ascii=False)}})
                        yield sse("content_block_stop", {"type": "content_block_stop", "index": index})
                        index += 1
                    reason = "tool_use" if found else stop_reason(event)
                    yield sse("message_delta", {"type": "message_delta",
                                                "delta": {"stop_reason": reason, "stop_sequence": event.stop_sequence},
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
        if isinstance(body, dict):
            body = {**body, "max_tokens": 1}  # not part of this request
        parsed = parse(body, self.h.settings.names)
        vocab = getattr(getattr(self.h.model, "args", None), "vocab_size", None) or len(self.h.tokenizer)
        tokens = await run_in_threadpool(prompt_tokens, parsed, self.h.tokenizer, vocab)
        return JSONResponse({"input_tokens": len(tokens)})
