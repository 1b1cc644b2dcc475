"""The HTTP side: a Starlette app with the OpenAI routes, the API key check and body limits.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /v1/models/{id},
GET /health, POST /v1/qa (qa_route.py), and the chat page at / (web.py). Every error is answered
with the OpenAI body {"error": {"message", "type", "param", "code"}}; no request can stop the server.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .engine import Delta, Done, Engine, Job, KVBudgetFull, QueueFull, TokenLogprob
from .formats import Formatter
from .prompts import gen_request
from .qa_route import QARoute
from .schemas import APIError, parse_chat, parse_completion
from .web import page_routes

log = logging.getLogger("mlxllama.serve")

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB
STATUS_TYPES = {401: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
                413: "invalid_request_error", 429: "requests", 500: "server_error", 503: "server_error"}


@dataclass
class Settings:
    model_id: str
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    default_max_tokens: int = 512
    default_temperature: float = 1.0  # the OpenAI API's default


def error_response(e: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status in (429, 503) else None
    if e.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class Handlers:
    def __init__(self, engine: Engine, model, tokenizer, settings: Settings):
        self.engine, self.model, self.tokenizer, self.settings = engine, model, tokenizer, settings

    # -- checks ----------------------------------------------------------------------------------

    def check_key(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode("utf-8", "replace"), f"Bearer {key}".encode()):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def read_json(self, request: Request) -> Any:
        limit = self.settings.max_body_bytes
        too_big = APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_big
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise too_big
        except ClientDisconnect:
            raise APIError(400, "the client went away while sending the body", code="incomplete_body") from None
        try:
            return json.loads(bytes(body))
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None

    # -- routes ----------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.settings.model_id, "load": self.engine.load})

    def model_card(self) -> dict[str, Any]:
        return {"id": self.settings.model_id, "object": "model", "created": int(time.time()), "owned_by": "mlxllama"}

    async def models(self, request: Request) -> Response:
        self.check_key(request)
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model_info(self, request: Request) -> Response:
        self.check_key(request)
        if request.path_params["model_id"] != self.settings.model_id:
            raise APIError(404, f"The model '{request.path_params['model_id'][:200]}' does not exist",
                           param="model", code="model_not_found")
        return JSONResponse(self.model_card())

    async def chat(self, request: Request) -> Response:
        return await self.complete(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self.complete(request, "completion")

    async def complete(self, request: Request, kind: str) -> Response:
        self.check_key(request)
        body = await self.read_json(request)
        parse = parse_chat if kind == "chat" else parse_completion
        parsed = parse(body, self.settings.model_id)
        gen = await run_in_threadpool(gen_request, parsed, self.tokenizer, self.model, self.settings.default_max_tokens,
                                      self.settings.default_temperature)
        try:
            job = self.engine.submit(gen, asyncio.get_running_loop())
        except QueueFull as e:
            raise APIError(429, f"The server is busy: {e}", code="rate_limit_exceeded", type="requests") from None
        except KVBudgetFull as e:
            if e.never:
                raise APIError(400, str(e), param="max_tokens", code="context_length_exceeded") from None
            raise APIError(503, str(e), code="kv_cache_full", type="server_error") from None
        tools = parsed.tools if parsed.tool_choice != "none" else None
        fmt = Formatter(kind, self.settings.model_id, self.tokenizer, parsed.logprobs, tools)
        watcher = asyncio.create_task(cancel_on_disconnect(request, job))
        if parsed.stream:
            return StreamingResponse(self.stream(job, fmt, parsed.include_usage, watcher),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            return await self.whole(job, fmt)
        finally:
            watcher.cancel()
            job.cancel()

    async def whole(self, job: Job, fmt: Formatter) -> Response:
        text: list[str] = []
        items: list[TokenLogprob] = []
        async for event in job.events():
            if isinstance(event, Delta):
                text.append(event.text)
                items.extend(event.logprobs)
            elif isinstance(event, Done):
                return JSONResponse(fmt.response("".join(text), items, event))
            else:
                raise APIError(500, event.message, code="generation_failed", type="server_error")
        raise APIError(500, "generation ended without a result", type="server_error")

    async def stream(self, job: Job, fmt: Formatter, include_usage: bool, watcher: asyncio.Task) -> AsyncIterator[str]:
        try:
            if fmt.kind == "chat":
                yield sse(fmt.chunk("", [], role=True, with_usage_field=include_usage))
            calls = fmt.call_stream()  # chat with tools: calls are held back and sent as tool_calls
            async for event in job.events():
                if isinstance(event, Delta):
                    text = calls.feed(event.text) if calls else event.text
                    if text or event.logprobs:
                        yield sse(fmt.chunk(text, event.logprobs, with_usage_field=include_usage))
                elif isinstance(event, Done):
                    reason = event.finish_reason
                    if calls:
                        rest, found = calls.finish()
                        if rest:
                            yield sse(fmt.chunk(rest, [], with_usage_field=include_usage))
                        for chunk in fmt.call_chunks(found, include_usage):
                            yield sse(chunk)
                        reason = "tool_calls" if found else reason
                    yield sse(fmt.chunk(None if fmt.kind == "chat" else "", [], reason,
                                        with_usage_field=include_usage))
                    if include_usage:
                        yield sse(fmt.usage_chunk(event))
                else:
                    yield sse(APIError(500, event.message, code="generation_failed", type="server_error").body())
                    return
            yield sse("[DONE]")
        finally:
            watcher.cancel()
            job.cancel()  # a no-op after Done; frees the slot at once when the client went away


async def cancel_on_disconnect(request: Request, job: Job) -> None:
    """Waits for the client to go away (the body has been read already), then cancels its job."""
    try:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                break
    except asyncio.CancelledError:
        return
    except Exception:  # the server is closing the connection
        pass
    job.cancel()


async def on_api_error(request: Request, exc: Exception) -> Response:
    return error_response(exc)  # type: ignore[arg-type]


async def on_http_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    message = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed on {request.url.path}"}
    return error_response(APIError(status, message.get(status, str(getattr(exc, "detail", exc))),
                                   type=STATUS_TYPES.get(status, "invalid_request_error")))


async def on_server_error(request: Request, exc: Exception) -> Response:
    log.exception("internal error", exc_info=exc)
    return error_response(APIError(500, f"internal error: {type(exc).__name__}", type="server_error"))


class HostCheck:
    """Answers 400 to requests whose Host header names none of `allowed` (port ignored)."""

    def __init__(self, app, allowed: list[str]):
        self.app, self.allowed = app, {h.lower() for h in allowed}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            host = Headers(scope=scope).get("host", "").lower()
            name = host[: host.index("]") + 1] if host.startswith("[") and "]" in host else host.split(":")[0]
            if name not in self.allowed:
                error = APIError(400, f"this server only answers requests to {', '.join(sorted(self.allowed))}",
                                 code="invalid_host")
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(model, tokenizer, model_id: str, *, api_key: str | None = None, max_batch: int = 8,
               max_queue: int = 16, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               default_max_tokens: int = 512, default_temperature: float = 1.0,
               allowed_hosts: list[str] | None = None, prefix_cache=None, kv_bits: int | None = None,
               kv_group_size: int = 64, quantized_kv_start: int = 0, max_kv_bytes: int | None = None) -> Starlette:
    """The ASGI app for one loaded model; the engine thread runs while the app is up.

    allowed_hosts: Host header names accepted (None: any). A server on a loopback address should
    accept only loopback names, so a web page cannot reach it through DNS rebinding.
    prefix_cache: an engine.PrefixCache reused across requests (None: every prompt read whole);
    kv_bits, kv_group_size, quantized_kv_start: a quantized KV cache; max_kv_bytes: the KV budget."""
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, prefix_cache=prefix_cache,
                    kv_bits=kv_bits, kv_group_size=kv_group_size, quantized_kv_start=quantized_kv_start,
                    max_kv_bytes=max_kv_bytes)
    h = Handlers(engine, model, tokenizer,
                 Settings(model_id, api_key, max_body_bytes, default_max_tokens, default_temperature))
    qa = QARoute(h)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            qa.close()
            await run_in_threadpool(engine.stop)

    routes = [
        Route("/health", h.health, methods=["GET"]),
        Route("/v1/models", h.models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", h.model_info, methods=["GET"]),
        Route("/v1/chat/completions", h.chat, methods=["POST"]),
        Route("/v1/completions", h.completions, methods=["POST"]),
        Route("/v1/qa", qa.handle, methods=["POST"]),
        *page_routes(),
    ]
    middleware = [Middleware(HostCheck, allowed=allowed_hosts)] if allowed_hosts else []
    app = Starlette(routes=routes, lifespan=lifespan, middleware=middleware, exception_handlers={
        APIError: on_api_error, HTTPException: on_http_error, Exception: on_server_error})
    app.state.engine = engine
    return app
