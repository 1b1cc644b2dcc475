"""The HTTP side: a Starlette app with the routes of every dialect, the API key check and body limits.

OpenAI routes here: POST /v1/chat/completions, POST /v1/completions, GET /v1/models,
GET /v1/models/{id} (each also without /v1); GET /health; GET /openapi.json (openapi.py); POST /v1/qa (qa_route.py) and the chat
page at / (web.py). The other dialects (responses.py, anthropic.py, ollama.py) and /metrics
(metrics.py) translate to the same checked request and run through `Handlers.start`. Every error is
answered in the shape of the dialect of its route (OpenAI's {"error": {"message", "type", "param",
"code"}} unless Anthropic's or Ollama's); no request can stop the server.
"""

from __future__ import annotations

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
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import anthropic, ollama
from .engine import Delta, Done, Engine
from .formats import Formatter
from .limits import HeaderLimit, lone_surrogate
from .metrics import CountRequests, Metrics
from .prompts import choices, gen_request
from .qa_route import QARoute
from .responses import Responses
from .runs import Run
from .schemas import APIError, ModelNames, Parsed, parse_chat, parse_completion
from .web import page_routes

log = logging.getLogger("mlxllama.serve")

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB
STATUS_TYPES = {401: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
                413: "invalid_request_error", 431: "invalid_request_error", 429: "requests", 500: "server_error", 503: "server_error"}


@dataclass
class Settings:
    names: ModelNames
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    default_max_tokens: int = 512
    default_temperature: float = 0.0  # greedy unless a request asks, as mlx-lm's server does

    @property
    def model_id(self) -> str:
        return self.names.primary


def error_response(e: APIError, path: str = "") -> JSONResponse:
    """The error in the shape of the dialect the path belongs to (OpenAI's unless Anthropic's or Ollama's)."""
    headers = {"Retry-After": "1"} if e.status in (429, 503) else None
    if e.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    if path.startswith("/v1/messages"):
        body = anthropic.error_body(e)
    elif path.startswith("/api/"):
        body = ollama.error_body(e)
    else:
        body = e.body()
    return JSONResponse(body, status_code=e.status, headers=headers)


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class Handlers:
    def __init__(self, engine: Engine, model, tokenizer, settings: Settings):
        self.engine, self.model, self.tokenizer, self.settings = engine, model, tokenizer, settings
        self.created = int(time.time())
        self.openapi_doc: dict[str, Any] | None = None

    # -- checks ----------------------------------------------------------------------------------

    def check_key(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        other = request.headers.get("x-api-key")  # Anthropic's header
        if not (hmac.compare_digest(given.encode("utf-8", "replace"), f"Bearer {key}".encode())
                or (other is not None and hmac.compare_digest(other.encode("utf-8", "replace"), key.encode()))):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>' or "
                           "'x-api-key: <key>'", code="invalid_api_key")

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
            value = json.loads(bytes(body))
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if lone_surrogate(body, value):
            raise APIError(400, "the request body is not valid Unicode: it escapes a lone UTF-16 surrogate "
                           "(\\ud800-\\udfff)", code="invalid_json")
        return value

    # -- routes ----------------------------------------------------------------------------------

    async def openapi(self, request: Request) -> Response:
        if self.openapi_doc is None:
            from importlib.metadata import version

            from .openapi import document

            names = self.settings.names
            self.openapi_doc = document(request.app.routes, "mlxllama", version("mlxllama"),
                                        auth=self.settings.api_key is not None,
                                        names=None if names.accept_any else names.names,
                                        vocab_size=getattr(self.tokenizer, "vocab_size", None))
        return JSONResponse(self.openapi_doc)

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.settings.model_id, "load": self.engine.load})

    def model_card(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "mlxllama"}

    async def models(self, request: Request) -> Response:
        self.check_key(request)
        return JSONResponse({"object": "list", "data": [self.model_card(n) for n in self.settings.names]})

    async def model_info(self, request: Request) -> Response:
        self.check_key(request)
        name = request.path_params["model_id"]
        if name not in self.settings.names:
            raise APIError(404, f"The model '{name[:200]}' does not exist", param="model", code="model_not_found")
        return JSONResponse(self.model_card(name))

    async def chat(self, request: Request) -> Response:
        return await self.complete(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self.complete(request, "completion")

    async def start(self, request: Request, parsed: Parsed) -> Run:
        """Tokenizes a checked request and submits its choices: the one path every dialect takes."""
        gen = await run_in_threadpool(gen_request, parsed, self.tokenizer, self.model, self.settings.default_max_tokens,
                                      self.settings.default_temperature)
        return Run.submit(self.engine, choices(gen, parsed.n), request, self.on_done)

    def on_done(self, done: Done) -> None:
        """Called once per finished choice (metrics hook it)."""

    async def complete(self, request: Request, kind: str) -> Response:
        self.check_key(request)
        body = await self.read_json(request)
        parse = parse_chat if kind == "chat" else parse_completion
        parsed = parse(body, self.settings.names)
        run = await self.start(request, parsed)
        tools = parsed.tools if parsed.tool_choice != "none" else None
        fmt = Formatter(kind, parsed.model or self.settings.model_id, self.tokenizer, parsed.logprobs, tools)
        if parsed.stream:
            return StreamingResponse(self.stream(run, fmt, parsed.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            return JSONResponse(fmt.response([(c.text, c.logprobs, c.done) for c in await run.collect()]))
        finally:
            run.close()

    async def stream(self, run: Run, fmt: Formatter, include_usage: bool) -> AsyncIterator[str]:
        try:
            if fmt.kind == "chat":
                for i in range(len(run.jobs)):
                    yield sse(fmt.chunk("", [], role=True, with_usage_field=include_usage, index=i))
            dones: list[Done] = []
            # chat with tools: each choice's calls are held back and sent as its tool_calls
            streams = [fmt.call_stream() for _ in run.jobs]
            async for i, event in run.events():
                calls = streams[i]
                if isinstance(event, Delta):
                    text = calls.feed(event.text) if calls else event.text
                    if text or event.logprobs:
                        yield sse(fmt.chunk(text, event.logprobs, with_usage_field=include_usage, index=i))
                elif isinstance(event, Done):
                    dones.append(event)
                    reason = event.finish_reason
                    if calls:
                        rest, found = calls.finish()
                        if rest:
                            yield sse(fmt.chunk(rest, [], with_usage_field=include_usage, index=i))
                        for chunk in fmt.call_chunks(found, include_usage, index=i):
                            yield sse(chunk)
                        reason = "tool_calls" if found else reason
                    yield sse(fmt.chunk(None if fmt.kind == "chat" else "", [], reason,
                                        with_usage_field=include_usage, index=i))
                else:
                    yield sse(APIError(500, event.message, code="generation_failed", type="server_error").body())
                    return
            if include_usage:
                yield sse(fmt.usage_chunk(dones))
            yield sse("[DONE]")
        finally:
            run.close()


async def on_api_error(request: Request, exc: Exception) -> Response:
    return error_response(exc, request.url.path)  # type: ignore[arg-type]


async def on_http_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    message = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed on {request.url.path}"}
    return error_response(APIError(status, message.get(status, str(getattr(exc, "detail", exc))),
                                   type=STATUS_TYPES.get(status, "invalid_request_error")), request.url.path)


async def on_server_error(request: Request, exc: Exception) -> Response:
    log.exception("internal error", exc_info=exc)
    return error_response(APIError(500, f"internal error: {type(exc).__name__}", type="server_error"), request.url.path)


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
                await error_response(error, scope.get("path", ""))(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(model, tokenizer, model_id: str, *, api_key: str | None = None, max_batch: int = 8,
               max_queue: int = 16, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               default_max_tokens: int = 512, default_temperature: float = 0.0,
               allowed_hosts: list[str] | None = None, served_model_names: list[str] | None = None,
               accept_any_model: bool = False, allowed_origins: list[str] | None = None, prefix_cache=None,
               kv_bits: int | None = None, kv_group_size: int = 64, quantized_kv_start: int = 0,
               max_kv_bytes: int | None = None) -> Starlette:
    """The ASGI app for one loaded model; the engine thread runs while the app is up.

    allowed_hosts: Host header names accepted (None: any). A server on a loopback address should
    accept only loopback names, so a web page cannot reach it through DNS rebinding.
    served_model_names: the names requests may use for the model (default: model_id); the first
    is the one responses carry. accept_any_model: take any name as this model.
    allowed_origins: web origins allowed to call the API from a browser (CORS); None: no CORS headers.
    prefix_cache: an engine.PrefixCache reused across requests (None: every prompt read whole);
    kv_bits, kv_group_size, quantized_kv_start: a quantized KV cache; max_kv_bytes: the KV budget."""
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, prefix_cache=prefix_cache,
                    kv_bits=kv_bits, kv_group_size=kv_group_size, quantized_kv_start=quantized_kv_start,
                    max_kv_bytes=max_kv_bytes)
    names = ModelNames(served_model_names or [model_id], accept_any_model)
    h = Handlers(engine, model, tokenizer,
                 Settings(names, api_key, max_body_bytes, default_max_tokens, default_temperature))
    metrics = Metrics(engine)
    h.on_done = metrics.done
    messages, responses, oll = anthropic.Messages(h), Responses(h), ollama.Ollama(h)
    qa = QARoute(h)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            qa.close()
            await run_in_threadpool(engine.stop)

    routes = [Route("/health", h.health, methods=["GET"]), Route("/openapi.json", h.openapi, methods=["GET"])]
    for prefix in ("/v1", ""):  # llama.cpp answers the OpenAI routes without /v1 too
        routes += [
            Route(f"{prefix}/models", h.models, methods=["GET"]),
            Route(f"{prefix}/models/{{model_id:path}}", h.model_info, methods=["GET"]),
            Route(f"{prefix}/chat/completions", h.chat, methods=["POST"]),
            Route(f"{prefix}/completions", h.completions, methods=["POST"]),
        ]
    routes += [
        Route("/metrics", metrics.endpoint, methods=["GET"]),
        Route("/v1/responses", responses.create, methods=["POST"]),
        Route("/v1/messages", messages.create, methods=["POST"]),
        Route("/v1/messages/count_tokens", messages.count_tokens, methods=["POST"]),
        Route("/api/version", oll.version, methods=["GET"]),
        Route("/api/tags", oll.tags, methods=["GET"]),
        Route("/api/ps", oll.ps, methods=["GET"]),
        Route("/api/show", oll.show, methods=["POST"]),
        Route("/api/chat", oll.chat, methods=["POST"]),
        Route("/api/generate", oll.generate, methods=["POST"]),
        Route("/v1/qa", qa.handle, methods=["POST"]),
        *page_routes(),
    ]
    middleware = []
    if allowed_origins:  # outermost: preflights are answered before any other check
        middleware.append(Middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["*"],
                                     allow_headers=["*"], expose_headers=["Retry-After"]))
    middleware.append(Middleware(HeaderLimit, error_response=error_response, api_error=APIError))
    middleware.append(Middleware(CountRequests, metrics=metrics, routes=routes))
    if allowed_hosts:
        middleware.append(Middleware(HostCheck, allowed=allowed_hosts))
    app = Starlette(routes=routes, lifespan=lifespan, middleware=middleware, exception_handlers={
        APIError: on_api_error, HTTPException: on_http_error, Exception: on_server_error})
    app.state.engine = engine
    app.state.metrics = metrics
    return app
