"""The server's side of the engine: one worker thread owns the model and the batched engine
(mlxllama.engine.BatchEngine); requests reach it through a queue.

Every model call happens on the worker thread (model inference is not thread-safe). Each
iteration of its loop drops requests whose client went away (`Job.cancel`, called from the event
loop), admits waiting requests while fewer than `max_batch` are active, runs one engine step
(a prefill chunk and one decoding step for every active sequence) and turns the step's outputs
into events on each request's asyncio queue. The prefix cache, when there is one, lets a request
whose prompt begins like an earlier one (a chat resent whole at every turn) read only the rest;
`Done.cached_tokens` says how many prompt tokens were reused.

Admission is first come, first served, and every active sequence advances one token per step.
A request beyond `max_batch` active plus `max_queue` waiting is refused (`QueueFull`, HTTP 429);
one whose KV cache would not fit `max_kv_bytes` with those already admitted is refused too
(`KVBudgetFull`: HTTP 503 and Retry-After while others run, 400 when it could never fit).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import mlx.core as mx
import numpy as np

from .. import device
from ..engine import BatchEngine, PrefixCache
from ..generation_options import OPTIONS
from ..sample import make_logits_processors, make_sampler

log = logging.getLogger("mlxllama.serve")


@dataclass
class GenRequest:
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = OPTIONS["top_p"].default
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: off; k: the chosen token's log-probability and k alternatives
    logit_bias: dict[int, float] | None = None
    top_k: int = OPTIONS["top_k"].default
    min_p: float = OPTIONS["min_p"].default
    repetition_penalty: float | None = OPTIONS["repetition_penalty"].default
    repetition_context_size: int = OPTIONS["repetition_context_size"].default
    presence_penalty: float = OPTIONS["presence_penalty"].default
    frequency_penalty: float = OPTIONS["frequency_penalty"].default
    constraint: Any = None  # a mlxllama.constrain.Constraint: the output follows its grammar


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the k most likely tokens, most likely first


@dataclass
class Delta:
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Done:
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV state came from the prefix cache
    prompt_seconds: float = 0.0  # from admission to its first token
    decode_seconds: float = 0.0  # from its first token to its last
    stop_sequence: str | None = None  # the stop string that ended it, if one did


@dataclass
class Failed:
    message: str


def stop_sequence(stream) -> str | None:
    """The stop string that ended a finished TextStream, if one did (not EOS or max tokens)."""
    m = getattr(stream, "matcher", None)
    if m is None:
        return None
    return next((s for s in m.stops if m.text.startswith(s, m.emitted)), None)


class QueueFull(Exception):
    pass


class KVBudgetFull(Exception):
    """The request's KV cache does not fit the server's budget: now (`never` False) or ever."""

    def __init__(self, message: str, never: bool):
        super().__init__(message)
        self.never = never


def kv_bytes_per_token(model, kv_bits: int | None = None, kv_group_size: int = 64) -> int:
    """KV cache bytes one position of one sequence takes, over all layers."""
    args = getattr(model, "args", None)
    layers = len(model.layers)
    if args is None or not hasattr(args, "head_dim"):
        return 0
    itemsize = model.model.norm.weight.dtype.size if hasattr(model, "model") else 4
    per_vector = args.head_dim * itemsize
    if kv_bits is not None:
        per_vector = args.head_dim * kv_bits // 8 + 2 * (args.head_dim // kv_group_size) * itemsize
    return layers * 2 * args.num_key_value_heads * per_vector


def default_max_kv_bytes() -> int:
    """Half the machine's memory (Metal: of the recommended working set)."""
    total = device.working_set_bytes() or device.memory_bytes()
    return total // 2 if total is not None else 8 << 30


class Job:
    """One request as both sides see it: the handler reads `events()`, the worker calls `_put`."""

    def __init__(self, request: GenRequest, loop: asyncio.AbstractEventLoop, release, kv_bytes: int = 0):
        self.request = request
        self.kv_bytes = kv_bytes  # reserved in the server's KV budget until released
        self.uid: int | None = None  # the engine's id of its sequence, once admitted
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.stream = None  # the engine's TextStream of its sequence, once admitted
        self.admitted = self.first = 0.0  # perf_counter at admission and at its first token
        self.cancelled = threading.Event()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._loop = loop
        self._release = lambda: release(self)
        self._released = False
        self._lock = threading.Lock()

    def _put(self, event) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.cancelled.set()
        if isinstance(event, (Done, Failed)):
            self.release()

    def release(self) -> None:
        """Frees this request's place in the server (idempotent)."""
        with self._lock:
            if self._released:
                return
            self._released = True
        self._release()

    def cancel(self) -> None:
        """The client went away: stop generating for it and free its place now. Called on the
        event loop; a reader still waiting on `events()` gets Failed."""
        if not self.cancelled.is_set():
            self.cancelled.set()
            self._queue.put_nowait(Failed("the request was cancelled"))
        self.release()

    async def events(self) -> AsyncIterator[Delta | Done | Failed]:
        """Events until Done or Failed; consecutive Deltas that are already waiting come merged."""
        while True:
            event = await self._queue.get()
            while isinstance(event, Delta) and not self._queue.empty():
                nxt = self._queue.get_nowait()
                if not isinstance(nxt, Delta):
                    yield event
                    event = nxt
                    break
                event = Delta(event.text + nxt.text, event.logprobs + nxt.logprobs)
            yield event
            if isinstance(event, (Done, Failed)):
                return


class Engine:
    def __init__(self, model, tokenizer, *, max_batch: int = 8, max_queue: int = 16, prefill_step: int = 512,
                 prefix_cache: PrefixCache | None = None, kv_bits: int | None = None, kv_group_size: int = 64,
                 quantized_kv_start: int = 0, max_kv_bytes: int | None = None):
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue, self.prefill_step = max_batch, max_queue, prefill_step
        self.prefix_cache = prefix_cache
        self.kv = dict(kv_bits=kv_bits, kv_group_size=kv_group_size, quantized_kv_start=quantized_kv_start)
        self.max_kv_bytes = max_kv_bytes
        self.bytes_per_token = kv_bytes_per_token(model, kv_bits, kv_group_size)
        # Overlap: queue step n+1 before handing out the tokens of step n (see engine.core).
        self.overlap = device.overlap_steps()
        self._cond = threading.Condition()
        self._incoming: collections.deque[Job] = collections.deque()
        self._in_system = 0  # requests admitted and not yet finished or cancelled
        self._reserved = 0  # KV bytes those requests may use
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._core: BatchEngine | None = None  # worker-only
        self._jobs: dict[int, Job] = {}  # worker-only: engine uid -> job

    # -- the event-loop side ---------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mlxllama-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def load(self) -> int:
        return self._in_system

    @property
    def queued(self) -> int:
        """Requests waiting for their prompt to be read."""
        core = self._core
        return len(self._incoming) + (len(core.sequences()) - len(core._rows) if core is not None else 0)

    @property
    def active(self) -> int:
        """Sequences in the decoding batch."""
        return len(self._core._rows) if self._core is not None else 0

    def submit(self, request: GenRequest, loop: asyncio.AbstractEventLoop) -> Job:
        need = (len(request.prompt) + request.max_tokens) * self.bytes_per_token
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if self._in_system >= self.max_batch + self.max_queue:
                raise QueueFull(f"{self._in_system} requests are running or waiting; try again later")
            if self.max_kv_bytes is not None and need > self.max_kv_bytes:
                raise KVBudgetFull(f"the prompt and max_tokens need {need} bytes of KV cache, more than the "
                                   f"server's --max-kv-bytes {self.max_kv_bytes}; send a shorter prompt or "
                                   "lower max_tokens", never=True)
            if self.max_kv_bytes is not None and self._reserved + need > self.max_kv_bytes:
                raise KVBudgetFull(f"the KV cache budget is in use ({self._reserved} of {self.max_kv_bytes} "
                                   "bytes); try again shortly", never=False)
            self._in_system += 1
            self._reserved += need
            job = Job(request, loop, self._release, need)
            self._incoming.append(job)
            self._cond.notify_all()
        return job

    def _release(self, job: Job) -> None:
        with self._cond:
            self._in_system -= 1
            self._reserved -= job.kv_bytes
            self._cond.notify_all()

    # -- the worker --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            # MLX streams this thread created must go with it: left for process exit, their
            # threads abort it ("terminate called without an active exception").
            if hasattr(mx, "clear_streams"):
                mx.clear_streams()

    def _new_core(self) -> BatchEngine:
        return BatchEngine(self.model, self.tokenizer, max_batch=self.max_batch, prefill_step=self.prefill_step,
                           prefix_cache=self.prefix_cache, overlap=self.overlap, **self.kv)

    def _loop(self) -> None:
        self._core = self._new_core()
        while True:
            with self._cond:
                while not (self._incoming or self._core.has_work or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    break
                while self._incoming and len(self._jobs) < self.max_batch:
                    self._admit(self._incoming.popleft())
            try:
                self._drop_cancelled()
                self._deliver(self._core.step())
            except Exception as e:  # a bug or out of memory: fail the active requests, keep serving
                log.exception("generation failed")
                self._fail_all(f"generation failed: {type(e).__name__}: {e}")
        self._fail_all("the server is shutting down")
        with self._cond:
            for job in self._incoming:
                job._put(Failed("the server is shutting down"))
            self._incoming.clear()

    def _admit(self, job: Job) -> None:
        if job.cancelled.is_set():
            return
        r = job.request
        try:
            sampler = make_sampler(r.temperature, r.top_p, r.top_k, r.min_p, r.seed) if r.temperature > 0 else None
            processors = make_logits_processors(r.logit_bias, r.repetition_penalty, r.repetition_context_size,
                                                r.presence_penalty, r.frequency_penalty, prompt_tokens=len(r.prompt))
            if r.constraint is not None:  # last: nothing after it can give a masked token weight again
                processors.append(r.constraint.processor())
            job.uid = self._core.add(r.prompt, max_tokens=r.max_tokens, sampler=sampler,
                                     logits_processors=processors, stop=r.stop, logprobs=r.logprobs is not None)
            job.stream = next((q.stream for q in self._core.sequences() if q.uid == job.uid), None)
            job.admitted = time.perf_counter()
        except Exception as e:  # settings the checks let through but MLX refuses
            job._put(Failed(f"cannot start this request: {type(e).__name__}: {e}"))
            return
        self._jobs[job.uid] = job

    def _drop_cancelled(self) -> None:
        for uid, job in list(self._jobs.items()):
            if job.cancelled.is_set():
                self._core.cancel(uid)
                del self._jobs[uid]

    def _deliver(self, outputs) -> None:
        """Turns the engine's outputs into events for their requests."""
        for out in outputs:
            job = self._jobs.get(out.uid)
            if job is None or job.cancelled.is_set():
                continue
            job.cached_tokens = out.cached_tokens
            job.completion_tokens += out.token >= 0
            if job.first == 0.0 and out.token >= 0:
                job.first = time.perf_counter()
            lps = []
            k = job.request.logprobs
            if k is not None and out.logprobs is not None and out.token not in self._core.eos:
                lps.append(self._logprob(np.array(out.logprobs), out.token, k))
            if out.text or lps:
                job._put(Delta(out.text, lps))
            if out.finish_reason is not None:
                del self._jobs[out.uid]
                n = len(job.request.prompt)
                now = time.perf_counter()
                first = job.first or now
                job._put(Done(out.finish_reason, n, job.completion_tokens, job.cached_tokens, first - job.admitted,
                              now - first, stop_sequence(job.stream) if out.finish_reason == "stop" else None))

    @staticmethod
    def _logprob(lp: np.ndarray, token: int, k: int) -> TokenLogprob:
        top: list[tuple[int, float]] = []
        if k > 0:
            idx = np.argpartition(-lp, k - 1)[:k]
            idx = idx[np.argsort(-lp[idx], kind="stable")]
            top = [(int(t), float(lp[t])) for t in idx]
        return TokenLogprob(token, float(lp[token]), top)

    def _fail_all(self, message: str) -> None:
        for uid, job in list(self._jobs.items()):
            job._put(Failed(message))
        self._jobs.clear()
        if self._core is not None:
            self._core.reset()
