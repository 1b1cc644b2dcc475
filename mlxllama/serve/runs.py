"""One HTTP request's generation, whatever its dialect: its choices submitted to the engine as rows
of the batch, their events merged, and everything cancelled when the client goes away."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from starlette.requests import Request

from .engine import Delta, Done, Engine, Failed, GenRequest, Job, KVBudgetFull, QueueFull, TokenLogprob
from .schemas import APIError


@dataclass
class Choice:
    """What one choice said, once its Done (or Failed) has come."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    done: Done | None = None


class Run:
    """The jobs of one request (one per choice) and the watcher that cancels them on disconnect."""

    def __init__(self, jobs: list[Job], request: Request | None = None, on_done=None):
        self.jobs = jobs
        self.started = time.perf_counter()
        self.on_done = on_done  # called with each Done (metrics)
        self.watcher = asyncio.create_task(cancel_on_disconnect(request, jobs)) if request is not None else None

    @classmethod
    def submit(cls, engine: Engine, requests: list[GenRequest], request: Request | None = None, on_done=None) -> "Run":
        """All choices or none: a 429 when the engine cannot take them all."""
        capacity = engine.max_batch + engine.max_queue
        if len(requests) > capacity:
            raise APIError(400, f"n={len(requests)} is more choices than this server runs at once ({capacity})",
                           param="n", code="invalid_value")
        loop = asyncio.get_running_loop()
        jobs: list[Job] = []
        try:
            for r in requests:
                jobs.append(engine.submit(r, loop))
        except (QueueFull, KVBudgetFull) as e:
            for job in jobs:
                job.cancel()
            if isinstance(e, QueueFull):
                raise APIError(429, f"The server is busy: {e}", code="rate_limit_exceeded", type="requests") from None
            if e.never:
                raise APIError(400, str(e), param="max_tokens", code="context_length_exceeded") from None
            raise APIError(503, str(e), code="kv_cache_full", type="server_error") from None
        return cls(jobs, request, on_done)

    async def events(self) -> AsyncIterator[tuple[int, Delta | Done | Failed]]:
        """(choice index, event) until every choice has its Done or Failed."""
        if len(self.jobs) == 1:
            async for event in self.jobs[0].events():
                self._seen(event)
                yield 0, event
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, job: Job) -> None:
            async for event in job.events():
                await queue.put((i, event))

        tasks = [asyncio.create_task(pump(i, job)) for i, job in enumerate(self.jobs)]
        try:
            left = len(self.jobs)
            while left:
                i, event = await queue.get()
                if isinstance(event, (Done, Failed)):
                    left -= 1
                self._seen(event)
                yield i, event
        finally:
            for t in tasks:
                t.cancel()

    def _seen(self, event) -> None:
        if isinstance(event, Done) and self.on_done is not None:
            self.on_done(event)

    async def collect(self) -> list[Choice]:
        """Every choice whole; a failed one raises a 500."""
        out = [Choice() for _ in self.jobs]
        async for i, event in self.events():
            if isinstance(event, Delta):
                out[i].text += event.text
                out[i].logprobs.extend(event.logprobs)
            elif isinstance(event, Done):
                out[i].done = event
            else:
                raise APIError(500, event.message, code="generation_failed", type="server_error")
        return out

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.cancel()
        for job in self.jobs:
            job.cancel()  # a no-op after Done; frees the slot at once when the client went away


async def cancel_on_disconnect(request: Request, jobs: list[Job]) -> None:
    """Waits for the client to go away (the body has been read already), then cancels its jobs."""
    try:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                break
    except asyncio.CancelledError:
        return
    except Exception:  # the server is closing the connection
        pass
    for job in jobs:
        job.cancel()
