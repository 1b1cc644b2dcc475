"""The batched generation engine: one model, many sequences, one decoding step for all at a time.

`BatchEngine` is driven by its owner's loop (`batch_generate`, the server's worker thread): `add`
a sequence, call `step()` until it has no work, read the `Output`s each step returns. Each step:

1. drops sequences that were cancelled;
2. makes one prefill call of at most about `prefill_step` tokens: several short waiting prompts
   are read together, a long one in chunks, so a long prompt never stalls the others for long; a
   prompt whose beginning the prefix cache holds starts from that KV state and is read alone; a
   prompt's first token comes straight from its prefill, and then it joins the batch;
3. queues one decoding step for all active sequences at once (engine.batch) and hands out the
   previous step's tokens (with `overlap`, on a GPU, while it computes the new one): each
   sequence's TextStream turns them into text and a finish reason.

Every sequence has its own offset (RoPE position), sampler, logits processors
(`(tokens, logits) -> logits`, tokens being everything it has fed so far), stop strings and
max_tokens. Sequences without a sampler or processors are decoded greedily by one batch-wide
argmax. A finished sequence's KV state goes into the prefix cache, if there is one.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, field
from typing import Sequence as Seq

import mlx.core as mx

from .. import device
from ..sample import Processor, Sampler, greedy
from .batch import KVQuant, make_batch
from .prefix_cache import FLOAT, PrefixCache, kind_of
from .text import TextStream


@dataclass
class Output:
    uid: int
    token: int
    logprobs: mx.array | None  # (V,) after the sequence's processors; None when not asked for
    text: str  # new text
    finish_reason: str | None  # "stop", "length" or None while running
    cached_tokens: int = 0  # prompt tokens of this sequence that came from the prefix cache


@dataclass
class Sequence:
    uid: int
    prompt: list[int]
    max_tokens: int
    stream: TextStream
    sampler: Sampler | None = None  # None: greedy
    processors: list[Processor] = field(default_factory=list)
    logprobs: bool = False
    cached: int = 0  # prompt tokens taken from the prefix cache
    generated: list[int] = field(default_factory=list)
    history: mx.array | None = None  # (L,) tokens fed so far, for the processors
    done: bool = False
    cancelled: bool = False

    @property
    def individual(self) -> bool:
        """Whether this sequence is sampled on its own (not by the batch-wide argmax)."""
        return self.sampler is not None or bool(self.processors)


class BatchEngine:
    def __init__(self, model, tokenizer, *, max_batch: int = 8, prefill_step: int = 512,
                 prefix_cache: PrefixCache | None = None, kv_bits: int | None = None, kv_group_size: int = 64,
                 quantized_kv_start: int = 0, overlap: bool | None = None):
        if max_batch < 1 or prefill_step < 1:
            raise ValueError("max_batch and prefill_step must be >= 1")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.prefill_step = max_batch, prefill_step
        self.prefix_cache = prefix_cache
        self.quant = KVQuant(kv_bits, kv_group_size, quantized_kv_start)
        self.kinds = (FLOAT,) if kv_bits is None else (kind_of(kv_bits, kv_group_size), FLOAT)
        # Overlap: queue step n+1 before handing out the tokens of step n (device.overlap_steps).
        self.overlap = device.overlap_steps() if overlap is None else overlap
        self.eos = set(tokenizer.eos_token_ids)
        self._uids = itertools.count()
        self._reset_state()

    def _reset_state(self) -> None:
        self._waiting: collections.deque[Sequence] = collections.deque()  # prompt not read yet
        self._group = None  # (prefill, sequences): prompts being read together
        self._rows: list[Sequence] = []  # decoding, in batch order
        self._batch = make_batch(self.model, self.quant)
        self._inputs: mx.array | None = None  # (B,) the next input token of every row
        self._pending = None  # (rows, tokens, logprobs) of the step queued last, not yet handed out
        self._finished_now: list[Output] = []  # sequences that end without computing (max_tokens 0)

    # -- the owner's side ------------------------------------------------------------------

    def add(self, prompt: Seq[int], *, max_tokens: int = 256, sampler: Sampler | None = None,
            logits_processors: list[Processor] | None = None, stop: Seq[str] | None = None,
            logprobs: bool = False) -> int:
        """Queues a sequence; returns its uid (the `Output.uid` of its tokens)."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("the prompt is empty")
        uid = next(self._uids)
        seq = Sequence(uid, prompt, max_tokens, TextStream(self.tokenizer, stop, max_tokens, self.eos),
                       None if sampler is greedy else sampler, list(logits_processors or []), logprobs)
        if max_tokens <= 0:
            seq.done = True
            self._finished_now.append(Output(uid, -1, None, "", "length"))
        else:
            self._waiting.append(seq)
        return uid

    def cancel(self, uid: int) -> None:
        """Stops a sequence; it produces no more outputs."""
        for seq in self.sequences():
            if seq.uid == uid:
                seq.cancelled = True

    def sequences(self) -> list[Sequence]:
        group = self._group[1] if self._group else []
        return [*self._rows, *group, *self._waiting]

    @property
    def admitted(self) -> int:
        """Sequences being read or decoded (at most max_batch)."""
        return len(self._rows) + (len(self._group[1]) if self._group else 0)

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._group or self._rows or self._pending or self._finished_now)

    def reset(self) -> list[int]:
        """Drops every sequence (after a failure); returns the uids that had not finished."""
        uids = [s.uid for s in self.sequences() if not s.done]
        self._reset_state()
        return uids

    def step(self) -> list[Output]:
        out, self._finished_now = self._finished_now, []
        if not self.overlap and self._pending is not None:
            out += self._hand_out(*self._pending)
            self._pending = None
        self._drop_cancelled()
        out += self._prefill_some()
        step = self._decode() if self._rows else None
        if self._pending is not None:
            out += self._hand_out(*self._pending)
        self._pending = step
        return out

    # -- inside a step ---------------------------------------------------------------------

    def _drop_cancelled(self) -> None:
        self._waiting = collections.deque(s for s in self._waiting if not s.cancelled)
        if self._group is not None and all(s.cancelled for s in self._group[1]):
            self._group = None
        gone = [i for i, s in enumerate(self._rows) if s.cancelled]
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

    def _next_group(self) -> None:
        """Takes waiting prompts for one prefill: a prefix-cache hit alone, else as many as fit."""
        if self._group is not None or not self._waiting or len(self._rows) >= self.max_batch:
            return
        room = self.max_batch - len(self._rows)
        first = self._waiting.popleft()
        hit = self.prefix_cache.lookup(first.prompt, self.kinds) if self.prefix_cache is not None else None
        if hit is not None:
            first.cached = hit.length
            self._group = (self._batch.prefill([first.prompt[hit.length :]], hit.states), [first])
            return
        seqs, longest = [first], len(first.prompt)
        while self._waiting and len(seqs) < room:
            longer = max(longest, len(self._waiting[0].prompt))
            if (len(seqs) + 1) * longer > self.prefill_step:
                break
            if self.prefix_cache is not None and self.prefix_cache.lookup(self._waiting[0].prompt, self.kinds,
                                                                          probe=True):
                break  # read on its own next, from its cached prefix
            seqs.append(self._waiting.popleft())
            longest = longer
        self._group = (self._batch.prefill([s.prompt for s in seqs]), seqs)

    def _prefill_some(self) -> list[Output]:
        self._next_group()
        if self._group is None:
            return []
        prefill, seqs = self._group
        if not prefill.done:
            prefill.run(self.prefill_step)
        if not prefill.done:
            return []
        self._group = None
        self._batch.add(prefill)
        self._rows.extend(seqs)
        for s in seqs:
            if s.individual:
                s.history = mx.array(s.prompt, dtype=mx.int32)
        # The first tokens come from the prefill's last position: handed out now, not a step later.
        first, logprobs = self._sample(seqs, prefill.logits)
        mx.eval(first, [lp for lp in logprobs if lp is not None])
        self._inputs = first if self._inputs is None else mx.concatenate([self._inputs, first])
        return self._hand_out(seqs, first, logprobs)

    def _decode(self):
        """Queues one step for every active row; returns (rows, tokens (B,), logprobs per row)."""
        tokens, logprobs = self._sample(self._rows, self._batch.step(self._inputs))
        self._inputs = tokens
        mx.async_eval([tokens, *self._batch.state(), *[lp for lp in logprobs if lp is not None]])
        return list(self._rows), tokens, logprobs

    @staticmethod
    def _sample(rows: list[Sequence], logits: mx.array) -> tuple[mx.array, list]:
        """logits (B, V) -> next tokens (B,) and each row's log-probabilities (V,) (None where
        not wanted); greedy rows share one argmax, the others run their processors and sampler."""
        tokens = mx.argmax(logits, axis=-1).astype(mx.int32)  # (B,) no B x V exps for greedy rows
        base = None
        logprobs: list = [None] * len(rows)
        parts = []
        for i, r in enumerate(rows):
            if not r.individual:
                parts.append(tokens[i : i + 1])
                if r.logprobs:
                    if base is None:
                        base = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # (B, V)
                    logprobs[i] = base[i]
                continue
            lg = logits[i : i + 1]  # (1, V)
            for p in r.processors:
                lg = p(r.history, lg)
            lp = lg - mx.logsumexp(lg, axis=-1, keepdims=True)
            tok = (r.sampler(lp) if r.sampler is not None else mx.argmax(lp, axis=-1)).astype(mx.int32)
            parts.append(tok.reshape(1))
            r.history = mx.concatenate([r.history, tok.reshape(1)])
            if r.logprobs:
                logprobs[i] = lp[0]
        if any(r.individual for r in rows):
            tokens = mx.concatenate(parts)
        return tokens, logprobs

    def _hand_out(self, rows: list[Sequence], tokens: mx.array, logprobs: list) -> list[Output]:
        """Turns a finished step into outputs; removes the rows that are done."""
        ids = tokens.tolist()
        out, finished = [], False
        for row, token, lp in zip(rows, ids, logprobs):
            if row.done or row.cancelled:
                continue
            row.generated.append(token)
            text, reason = row.stream.add(token)
            out.append(Output(row.uid, token, lp, text, reason, row.cached))
            if reason is not None:
                self._remember(row)
                row.done = finished = True
        if finished:
            self._remove([i for i, r in enumerate(self._rows) if r.done])
        return out

    def _remember(self, row: Sequence) -> None:
        """Puts a finished row's KV state (prompt and generated tokens fed) into the prefix cache."""
        if self.prefix_cache is None or row not in self._rows:
            return
        b = self._rows.index(row)
        states = self._batch.row_state(b)
        first = states[0][0]
        n = (first[0] if isinstance(first, tuple) else first).shape[2]
        tokens = (row.prompt + row.generated)[:n]
        kind = kind_of(self.quant.bits, self.quant.group_size) if isinstance(first, tuple) else FLOAT
        self.prefix_cache.insert(tokens, states, kind)
