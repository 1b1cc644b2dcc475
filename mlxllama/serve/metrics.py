"""`GET /metrics` in Prometheus' text format (prometheus_client), one registry per app.

Requests by route, method and status; prompt and generated tokens; prefill and decode speed per
finished choice; the engine's queue depth and active batch, read when scraped.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match

from .engine import Done

SPEED_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)


class Metrics:
    def __init__(self, engine):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("mlxllama_http_requests", "HTTP requests answered, by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.prompt_tokens = Counter("mlxllama_prompt_tokens", "Prompt tokens read (once per choice)", registry=r)
        self.cached_tokens = Counter("mlxllama_cached_prompt_tokens", "Prompt tokens reused from the prefix cache",
                                     registry=r)
        self.generated_tokens = Counter("mlxllama_generated_tokens", "Tokens generated", registry=r)
        self.finished = Counter("mlxllama_choices_finished", "Choices finished, by finish reason", ["reason"], registry=r)
        self.prefill_speed = Histogram("mlxllama_prefill_tokens_per_second", "Prompt tokens per second of prefill",
                                       buckets=SPEED_BUCKETS, registry=r)
        self.decode_speed = Histogram("mlxllama_decode_tokens_per_second", "Generated tokens per second after the first",
                                      buckets=SPEED_BUCKETS, registry=r)
        Gauge("mlxllama_queue_depth", "Requests waiting for their prompt to be read", registry=r).set_function(
            lambda: engine.queued)
        Gauge("mlxllama_active_batch", "Sequences in the decoding batch", registry=r).set_function(lambda: engine.active)
        Gauge("mlxllama_requests_in_system", "Requests running or waiting", registry=r).set_function(lambda: engine.load)

    def done(self, d: Done) -> None:
        self.prompt_tokens.inc(d.prompt_tokens)
        self.generated_tokens.inc(d.completion_tokens)
        self.cached_tokens.inc(d.cached_tokens)
        self.finished.labels(d.finish_reason).inc()
        if d.prompt_seconds > 0:
            self.prefill_speed.observe(d.prompt_tokens / d.prompt_seconds)
        if d.decode_seconds > 0 and d.completion_tokens > 1:
            self.decode_speed.observe((d.completion_tokens - 1) / d.decode_seconds)

    async def endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class CountRequests:
    """ASGI middleware: counts every HTTP response by route template (not raw path), method and status."""

    def __init__(self, app, metrics: Metrics, routes):
        self.app, self.metrics, self.routes = app, metrics, routes

    def _route(self, scope) -> str:
        for route in self.routes:
            match, _ = route.matches(scope)
            if match != Match.NONE:
                return route.path
        return "unmatched"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(self._route(scope), scope["method"], str(status["code"])).inc()
