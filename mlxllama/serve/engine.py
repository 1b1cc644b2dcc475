"""The scheduler: one worker thread owns the model; requests reach it through a queue.

Every model call happens on the worker thread (model inference is not thread-safe). Each
iteration of its loop:

1. drops requests whose client went away (`Job.cancel`, called from the event loop);
2. admits waiting requests while fewer than `max_batch` are active, and makes one prefill call
   of at most about `prefill_step` tokens: several short prompts are read together, a long one
   in chunks, so a long prompt never stalls the others for long; a prompt's first token comes
   straight from its prefill, and then it joins the batch;
3. queues one decoding step for all active sequences at once (`batch.py`) and hands the previous
   step's tokens to their requests (on a GPU while it computes the new step): text through the
   detokenizer and stop-string matcher, then an event on the request's asyncio queue.

Admission is first come, first served, and every active sequence advances one token per step.
A request beyond `max_batch` active plus `max_queue` waiting is refused (`QueueFull`, HTTP 429).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import mlx.core as mx
import numpy as np

from ..generate import StopMatcher
from ..sample import make_sampler
from .batch import make_batch

log = logging.getLogger("mlxllama.serve")


@dataclass
class GenRequest:
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: off; k: the chosen token's log-probability and k alternatives
    logit_bias: dict[int, float] | None = None
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


@dataclass
class Failed:
    message: str


class QueueFull(Exception):
    pass


class Job:
    """One request as both sides see it: the handler reads `events()`, the worker calls `_put`."""

    def __init__(self, request: GenRequest, loop: asyncio.AbstractEventLoop, release):
        self.request = request
        self.cancelled = threading.Event()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._loop = loop
        self._release = release
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


class Row:
    """Worker-side state of one sequence: sampling, detokenizing, stop strings, counting."""

    def __init__(self, job: Job, tokenizer, eos: set[int]):
        r = job.request
        self.job = job
        self.sampler = make_sampler(r.temperature, r.top_p, 0, 0.0, r.seed) if r.temperature > 0 else None
        self.bias = None
        if r.logit_bias:
            self.bias = (mx.array(list(r.logit_bias), dtype=mx.int32), mx.array(list(r.logit_bias.values())))
        self.constraint = r.constraint.processor() if r.constraint is not None else None
        self.detok = tokenizer.detokenizer
        self.matcher = StopMatcher(r.stop)
        self.eos = eos
        self.n = 0
        self.done = False

    @property
    def individual(self) -> bool:
        """Whether this row is sampled on its own (not by the batch-wide argmax)."""
        return self.sampler is not None or self.bias is not None or self.constraint is not None

    def accept(self, token: int) -> tuple[str, str | None]:
        """One generated token -> (text to emit, finish reason or None); as stream_generate does."""
        self.n += 1
        if token in self.eos:
            self.detok.finalize()
            text, _ = self.matcher.feed(self.detok.last_segment)
            return text + self.matcher.flush(), "stop"
        self.detok.add_token(token)
        text, stopped = self.matcher.feed(self.detok.last_segment)
        if stopped:
            return text, "stop"
        if self.n >= self.job.request.max_tokens:
            self.detok.finalize()
            more, stopped = self.matcher.feed(self.detok.last_segment)
            return text + more + ("" if stopped else self.matcher.flush()), "stop" if stopped else "length"
        return text, None


class Engine:
    def __init__(self, model, tokenizer, *, max_batch: int = 8, max_queue: int = 16, prefill_step: int = 512):
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue, self.prefill_step = max_batch, max_queue, prefill_step
        self.eos = set(tokenizer.eos_token_ids)
        # Overlap: queue step n+1 before handing out the tokens of step n. That hides host work
        # behind a GPU; the CPU backend computes most of a step inside async_eval, so there it
        # would only hold every token back by one step.
        self.overlap = mx.default_device() != mx.cpu
        self._cond = threading.Condition()
        self._incoming: collections.deque[Job] = collections.deque()
        self._in_system = 0  # requests admitted and not yet finished or cancelled
        self._stopping = False
        self._thread: threading.Thread | None = None
        # worker-only state
        self._waiting: collections.deque[Row] = collections.deque()  # admitted, prompt not read yet
        self._group = None  # (prefill, rows): prompts being read together
        self._rows: list[Row] = []
        self._batch = None
        self._inputs: mx.array | None = None  # (B,) the next input token of every row
        self._pending = None  # (rows, tokens, logprobs) of the step queued last, not yet handed out

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

    def submit(self, request: GenRequest, loop: asyncio.AbstractEventLoop) -> Job:
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if self._in_system >= self.max_batch + self.max_queue:
                raise QueueFull(f"{self._in_system} requests are running or waiting; try again later")
            self._in_system += 1
            job = Job(request, loop, self._release)
            self._incoming.append(job)
            self._cond.notify_all()
        return job

    def _release(self) -> None:
        with self._cond:
            self._in_system -= 1
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

    def _loop(self) -> None:
        self._batch = make_batch(self.model)
        while True:
            with self._cond:
                while not (self._incoming or self._waiting or self._group or self._rows or self._pending
                           or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    break
                while self._incoming and self._admitted() < self.max_batch:
                    job = self._incoming.popleft()
                    if job.cancelled.is_set():
                        continue
                    try:
                        self._waiting.append(Row(job, self.tokenizer, self.eos))
                    except Exception as e:  # settings the checks let through but MLX refuses
                        job._put(Failed(f"cannot start this request: {type(e).__name__}: {e}"))
            try:
                self._iteration()
            except Exception as e:  # a bug or out of memory: fail the active requests, keep serving
                log.exception("generation failed")
                self._fail_all(f"generation failed: {type(e).__name__}: {e}")
        self._fail_all("the server is shutting down")
        with self._cond:
            for job in self._incoming:
                job._put(Failed("the server is shutting down"))
            self._incoming.clear()

    def _iteration(self) -> None:
        if not self.overlap and self._pending is not None:
            self._hand_out(*self._pending)
            self._pending = None
        self._drop_cancelled()
        self._prefill_some()
        step = self._decode() if self._rows else None
        if self._pending is not None:
            self._hand_out(*self._pending)
        self._pending = step

    def _drop_cancelled(self) -> None:
        self._waiting = collections.deque(r for r in self._waiting if not r.job.cancelled.is_set())
        if self._group is not None and all(r.job.cancelled.is_set() for r in self._group[1]):
            self._group = None
        gone = [i for i, r in enumerate(self._rows) if r.job.cancelled.is_set()]
        if gone:
            self._remove(gone)

    def _remove(self, indices: list[int]) -> None:
        drop = set(indices)
        for i in drop:
            self._rows[i].done = True
        keep = [i for i in range(len(self._rows)) if i not in drop]
        self._batch.keep(keep)
        self._rows = [self._rows[i] for i in keep]
        self._inputs = self._inputs[mx.array(keep, dtype=mx.int32)] if keep else None

    def _admitted(self) -> int:
        return len(self._rows) + len(self._waiting) + (len(self._group[1]) if self._group else 0)

    def _prefill_some(self) -> None:
        """One prefill call of at most about `prefill_step` tokens: waiting prompts are read
        together (left-padded), a long one alone in chunks; read prompts join the batch."""
        if self._group is None and self._waiting:
            rows = [self._waiting.popleft()]
            longest = len(rows[0].job.request.prompt)
            while self._waiting:
                longer = max(longest, len(self._waiting[0].job.request.prompt))
                if (len(rows) + 1) * longer > self.prefill_step:
                    break
                rows.append(self._waiting.popleft())
                longest = longer
            self._group = (self._batch.prefill([r.job.request.prompt for r in rows]), rows)
        if self._group is None:
            return
        prefill, rows = self._group
        if not prefill.done:
            prefill.run(self.prefill_step)
        if not prefill.done:
            return
        self._group = None
        self._batch.add(prefill)
        self._rows.extend(rows)
        # The first tokens come from the prefill's last position: handed out now, not a step later.
        first, logprobs = self._sample(rows, prefill.logits, None)
        mx.eval(first, logprobs)
        self._inputs = first if self._inputs is None else mx.concatenate([self._inputs, first])
        self._hand_out(rows, first, logprobs)

    def _decode(self):
        """Queues one step for every active row; returns (rows, tokens (B,), logprobs (B, V))."""
        tokens, logprobs = self._sample(self._rows, self._batch.step(self._inputs), self._inputs)
        self._inputs = tokens
        wanted = [tokens, *self._batch.state()]
        if any(r.job.request.logprobs is not None for r in self._rows):
            wanted.append(logprobs)
        mx.async_eval(wanted)
        return list(self._rows), tokens, logprobs

    @staticmethod
    def _sample(rows: list[Row], logits: mx.array, fed: mx.array | None) -> tuple[mx.array, mx.array]:
        """logits (B, V) -> next tokens (B,) and log-probabilities (B, V); greedy rows in one argmax.
        fed: the tokens (B,) that produced these logits (None after a prefill): constrained rows
        move their matchers on by them before masking."""
        fed_ids = fed.tolist() if fed is not None and any(r.constraint for r in rows) else None
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # (B, V), lazy: evaluated only if used
        tokens = mx.argmax(logits, axis=-1).astype(mx.int32)  # (B,) the same argmax, without B x V exps
        if any(r.individual for r in rows):
            parts = []
            for i, r in enumerate(rows):
                if not r.individual:
                    parts.append(tokens[i : i + 1])
                    continue
                lp = logprobs[i : i + 1]
                if r.bias is not None:
                    lp = lp.at[:, r.bias[0]].add(r.bias[1].astype(lp.dtype))
                if r.constraint is not None:
                    if fed_ids is not None:
                        r.constraint.advance([fed_ids[i]])
                    lp = r.constraint.mask(lp)
                parts.append((r.sampler(lp) if r.sampler else mx.argmax(lp, axis=-1)).astype(mx.int32))
            tokens = mx.concatenate(parts)
        return tokens, logprobs

    def _hand_out(self, rows: list[Row], tokens: mx.array, logprobs: mx.array) -> None:
        """Turns a finished step into events; removes the rows that are done."""
        ids = tokens.tolist()
        finished = []
        for i, (row, token) in enumerate(zip(rows, ids)):
            if row.done or row.job.cancelled.is_set():
                continue
            text, reason = row.accept(token)
            lps = []
            k = row.job.request.logprobs
            if k is not None and token not in self.eos:
                lps.append(self._logprob(np.array(logprobs[i]), token, k))
            if text or lps:
                row.job._put(Delta(text, lps))
            if reason is not None:
                row.job._put(Done(reason, len(row.job.request.prompt), row.n))
                row.done = True
                finished.append(row)
        if finished:
            self._remove([i for i, r in enumerate(self._rows) if r.done])

    @staticmethod
    def _logprob(lp: np.ndarray, token: int, k: int) -> TokenLogprob:
        top: list[tuple[int, float]] = []
        if k > 0:
            idx = np.argpartition(-lp, k - 1)[:k]
            idx = idx[np.argsort(-lp[idx], kind="stable")]
            top = [(int(t), float(lp[t])) for t in idx]
        return TokenLogprob(token, float(lp[token]), top)

    def _fail_all(self, message: str) -> None:
        for row in [*self._rows, *self._waiting, *(self._group[1] if self._group else [])]:
            if not row.done:
                row.done = True
                row.job._put(Failed(message))
        self._rows, self._waiting, self._group, self._pending, self._inputs = [], collections.deque(), None, None, None
        self._batch = make_batch(self.model)
