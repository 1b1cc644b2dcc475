"""Generation in layers: generate_step (tokens) -> stream_generate (response records) -> generate (text)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import mlx.core as mx

from .errors import InputError
from .memory import peak_memory_gb
from .models import make_cache
from .sample import Processor, Sampler, make_logits_processors, make_sampler


@dataclass
class GenerationResponse:
    text: str  # new text since the previous record
    token: int
    logprobs: mx.array  # (V,)
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: str | None = None  # "stop", "length" or None while running
    from_draft: bool = False


def context_length(model) -> int | None:
    args = getattr(model, "args", None)
    return getattr(args, "max_position_embeddings", None)


def check_prompt(model, n_prompt: int, cache: list | None, max_kv_size: int | None) -> None:
    if n_prompt == 0:
        raise InputError("the prompt is empty")
    limit = context_length(model)
    used = n_prompt + (cache[0].offset if cache else 0)
    if limit and max_kv_size is None and used > limit:
        raise InputError(f"the prompt is {used} tokens, longer than the model's context of {limit} tokens")


def prefill(model, tokens: mx.array, cache: list, step: int = 512) -> mx.array:
    """Runs all but the last token through the model in chunks, filling the cache; returns the last
    token (1,). Only the cache is evaluated, so the vocabulary projection never runs on these rows."""
    while tokens.size > 1:
        n = min(step, tokens.size - 1)
        model(tokens[:n][None], cache=cache)
        mx.eval([c.state for c in cache])
        tokens = tokens[n:]
        mx.clear_cache()
    return tokens


def generate_step(
    prompt: mx.array,
    model,
    *,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    logits_processors: list[Processor] | None = None,
    max_kv_size: int | None = None,
    prompt_cache: list | None = None,
    prefill_step_size: int = 512,
    compiled: bool = False,
) -> Iterator[tuple[int, mx.array]]:
    """Yields (token, logprobs (V,)) pairs. The next step is queued before the current token is
    handed out (mx.async_eval), so the host never waits on the device between tokens.
    compiled=True decodes with one mx.compile'd graph per step (mlxllama.compiled) where the model
    and cache allow it (our models, no prompt_cache, no max_kv_size)."""
    sampler = sampler or make_sampler()
    processors = logits_processors or []
    cache = prompt_cache if prompt_cache is not None else make_cache(model, max_kv_size)
    history = prompt if processors else None
    forward = None  # the compiled one-token forward, once the prompt is in the cache

    def step(y: mx.array) -> tuple[mx.array, mx.array]:
        nonlocal history
        if forward is not None:
            logits = forward(y)  # (1, V)
        else:
            logits = model(y[None], cache=cache)[:, -1, :]  # (1, V)
        if processors:
            history = mx.concatenate([history, y]) if history is not None and history is not y else y
            for p in processors:
                logits = p(history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs), logprobs.squeeze(0)

    y = prefill(model, prompt.astype(mx.int32), cache, prefill_step_size)
    if processors:
        history = prompt[: prompt.size - y.size]
    y, logprobs = step(y)
    mx.async_eval(y, logprobs)
    if compiled and prompt_cache is None and max_kv_size is None and max_tokens > 1:
        from .compiled import CompiledForward, supports_compiled_step

        if supports_compiled_step(model):
            forward = CompiledForward(model, cache)
    n = 0
    while True:
        if n != max_tokens:
            next_y, next_logprobs = step(y)
            mx.async_eval(next_y, next_logprobs)
        if n == 0:
            mx.eval(y)
        if n == max_tokens:
            break
        yield y.item(), logprobs
        if n % 256 == 0:
            mx.clear_cache()
        y, logprobs = next_y, next_logprobs
        n += 1


class StopMatcher:
    """Finds stop strings across token boundaries and holds back text that may begin one."""

    def __init__(self, stops: Sequence[str] | None):
        self.stops = [s for s in (stops or []) if s]
        self.text = ""  # generated text so far
        self.emitted = 0  # how much of it was handed out

    def feed(self, segment: str) -> tuple[str, bool]:
        """Adds text; returns (text safe to emit now, whether a stop string was found)."""
        self.text += segment
        if not self.stops:
            out, self.emitted = self.text[self.emitted :], len(self.text)
            return out, False
        start = max(0, self.emitted - max(map(len, self.stops)))
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            out = self.text[self.emitted : end] if end > self.emitted else ""
            self.emitted = max(self.emitted, end)
            return out, True
        hold = self._partial_suffix()
        end = max(self.emitted, len(self.text) - hold)
        out, self.emitted = self.text[self.emitted : end], end
        return out, False

    def _partial_suffix(self) -> int:
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    best = max(best, k)
                    break
        return best

    def flush(self) -> str:
        out, self.emitted = self.text[self.emitted :], len(self.text)
        return out


def encode_prompt(tokenizer, prompt: str | Sequence[int] | mx.array) -> mx.array:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise InputError("the prompt is empty")
        return mx.array(tokenizer.encode(prompt), dtype=mx.int32)
    return mx.array(list(prompt) if not isinstance(prompt, mx.array) else prompt, dtype=mx.int32)


def token_iterator(prompt: mx.array, model, *, draft_model=None, prompt_lookup: int = 0,
                   num_draft_tokens: int | None = None, lookup_context: Sequence[int] | None = None,
                   **kwargs) -> Iterator[tuple[int, mx.array, bool]]:
    """Chooses plain or speculative decoding; yields (token, logprobs, from_draft)."""
    if draft_model is not None or prompt_lookup:
        from .speculative import speculative_generate_step

        kwargs.pop("compiled", None)
        yield from speculative_generate_step(
            prompt, model, draft_model=draft_model, prompt_lookup=prompt_lookup,
            num_draft_tokens=num_draft_tokens, lookup_context=lookup_context, **kwargs,
        )
        return
    from .constrain.decode import fast_forward_generate_step, find_constraint

    constraint = find_constraint(kwargs.get("logits_processors"))
    if constraint is not None:  # forced tokens are read in one call with the sampled one
        for token, logprobs in fast_forward_generate_step(prompt, model, constraint=constraint, **kwargs):
            yield token, logprobs, False
        return
    for token, logprobs in generate_step(prompt, model, **kwargs):
        yield token, logprobs, False


def stream_generate(
    model,
    tokenizer,
    prompt: str | Sequence[int] | mx.array,
    *,
    max_tokens: int = 256,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int | None = None,
    repetition_penalty: float | None = None,
    repetition_context_size: int = 20,
    logit_bias: dict[int, float] | None = None,
    stop: Sequence[str] | None = None,
    sampler: Sampler | None = None,
    logits_processors: list[Processor] | None = None,
    max_kv_size: int | None = None,
    prompt_cache: list | None = None,
    prefill_step_size: int = 512,
    draft_model=None,
    prompt_lookup: int = 0,
    num_draft_tokens: int | None = None,
    lookup_context: Sequence[int] | None = None,
    compiled: bool = False,
    response_format: Any = None,
) -> Iterator[GenerationResponse]:
    """Yields a GenerationResponse per token; the last one carries finish_reason.
    lookup_context: tokens before `prompt` that prompt lookup may draft from as well, typically
    what `prompt_cache` already holds (a document, earlier chat turns).
    response_format: constrains the output (mlxllama.constrain): a JSON schema dict, a Pydantic
    model class, {"type": "json_object"}, {"type": "regex", "regex": ...}, a Grammar or Constraint."""
    if max_tokens < 0:
        raise InputError(f"max_tokens must be >= 0, got {max_tokens}")
    constraint = format_processor(tokenizer, response_format, bool(draft_model is not None or prompt_lookup))
    tokens = encode_prompt(tokenizer, prompt)
    check_prompt(model, tokens.size, prompt_cache, max_kv_size)
    sampler = sampler or make_sampler(temp, top_p, top_k, min_p, seed)
    processors = (logits_processors or []) + make_logits_processors(logit_bias, repetition_penalty,
                                                                     repetition_context_size)
    if constraint is not None:
        processors.append(constraint)  # last: nothing after it can give a masked token weight again
    if seed is not None:
        mx.random.seed(seed)
    eos = set(tokenizer.eos_token_ids)
    detok = tokenizer.detokenizer
    matcher = StopMatcher(stop)
    n_prompt = tokens.size

    tic = time.perf_counter()
    prompt_tps, n = 0.0, 0
    steps = token_iterator(
        tokens, model, draft_model=draft_model, prompt_lookup=prompt_lookup, num_draft_tokens=num_draft_tokens,
        lookup_context=lookup_context, max_tokens=max_tokens, sampler=sampler, logits_processors=processors,
        max_kv_size=max_kv_size, prompt_cache=prompt_cache, prefill_step_size=prefill_step_size, compiled=compiled,
    )

    def record(text, token, logprobs, reason, from_draft=False):
        elapsed = time.perf_counter() - tic
        return GenerationResponse(text, token, logprobs, n_prompt, prompt_tps, n,
                                  n / elapsed if elapsed > 0 else 0.0, peak_memory_gb(), reason, from_draft)

    token, logprobs = -1, None
    for token, logprobs, from_draft in steps:
        if n == 0:
            prompt_time = time.perf_counter() - tic
            prompt_tps = n_prompt / prompt_time if prompt_time > 0 else 0.0
            tic = time.perf_counter()
        n += 1
        if token in eos:
            detok.finalize()
            text, _ = matcher.feed(detok.last_segment)
            yield record(text + matcher.flush(), token, logprobs, "stop", from_draft)
            return
        detok.add_token(token)
        text, stopped = matcher.feed(detok.last_segment)
        if stopped:
            yield record(text, token, logprobs, "stop", from_draft)
            return
        if n == max_tokens:
            detok.finalize()
            text2, stopped = matcher.feed(detok.last_segment)
            text += text2
            yield record(text + ("" if stopped else matcher.flush()), token, logprobs,
                         "stop" if stopped else "length", from_draft)
            return
        yield record(text, token, logprobs, None, from_draft)
    if n == 0:  # max_tokens == 0
        yield record("", -1, mx.zeros((0,)), "length")


def format_processor(tokenizer, response_format: Any, speculative: bool = False) -> Processor | None:
    """response_format -> the logits processor that enforces it for one sequence, or None."""
    if response_format is None:
        return None
    from .constrain import constraint_for
    from .errors import GrammarError

    constraint = constraint_for(tokenizer, response_format)
    if constraint is None:
        return None
    if speculative:
        raise GrammarError("response_format cannot be combined with speculative decoding (draft model or prompt lookup)")
    return constraint.processor()


def generate(model, tokenizer, prompt, verbose: bool = False, **kwargs) -> str:
    """Returns the generated text; with verbose=True it streams to stdout and prints speeds."""
    text, last = "", None
    for last in stream_generate(model, tokenizer, prompt, **kwargs):
        if verbose:
            print(last.text, end="", flush=True)
        text += last.text
    if verbose and last is not None:
        print()
        print_stats(last)
    return text


def print_stats(r: GenerationResponse, file=None) -> None:
    out = file or sys.stdout
    print("=" * 10, file=out)
    print(f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec", file=out)
    print(f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec", file=out)
    print(f"Peak memory: {r.peak_memory:.3f} GB", file=out)


# ---------------------------------------------------------------------------------------------
# Batched generation: several prompts, left padding, per-sequence stopping.


def padding_mask(pad: mx.array, offset: int, L: int) -> mx.array:
    """(B, 1, L, offset+L) bool: causal, not on padding; each position may always see itself
    (so fully padded rows stay finite)."""
    q = mx.arange(offset, offset + L)[:, None]  # (L, 1)
    k = mx.arange(offset + L)[None]  # (1, S)
    allowed = (q >= k)[None] & (k[None] >= pad[:, None, None])  # (B, L, S)
    allowed = allowed | (q == k)[None]
    return allowed[:, None]


def batch_generate(
    model,
    tokenizer,
    prompts: Sequence[str | Sequence[int]],
    *,
    max_tokens: int = 256,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int | None = None,
    stop: Sequence[str] | None = None,
    prefill_step_size: int = 512,
    sampler: Sampler | None = None,
    response_format: Any = None,
) -> list[str]:
    """Generates for several prompts at once; each stops on its own EOS, stop string or max_tokens.
    response_format: one format for every prompt, or a list with one per prompt (None: free text)."""
    encoded = [encode_prompt(tokenizer, p).tolist() for p in prompts]
    formats = list(response_format) if isinstance(response_format, (list, tuple)) else [response_format] * len(encoded)
    if len(formats) != len(encoded):
        raise InputError(f"response_format has {len(formats)} entries for {len(encoded)} prompts")
    for toks in encoded:
        check_prompt(model, len(toks), None, None)
    row_procs = [format_processor(tokenizer, f) for f in formats]
    if not hasattr(model, "make_cache") or "mask" not in model.__call__.__code__.co_varnames:
        return [generate(model, tokenizer, p, max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k,
                         min_p=min_p, seed=seed, stop=stop, logits_processors=[q] if q else None)
                for p, q in zip(encoded, row_procs)]
    greedy = sampler is None and temp == 0
    sampler = sampler or make_sampler(temp, top_p, top_k, min_p, seed)
    B, longest = len(encoded), max(map(len, encoded))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pad = mx.array([longest - len(t) for t in encoded])  # (B,)
    tokens = mx.array([[pad_id] * (longest - len(t)) + t for t in encoded], dtype=mx.int32)  # (B, L)
    cache = model.make_cache()

    generated: list[list[int]] | None = None  # per row, for the rows' logits processors

    def constrain(x: mx.array, logits: mx.array) -> mx.array:
        nonlocal generated
        if generated is None:  # the first step: the histories are the prompts
            generated = [[] for _ in range(B)]
        else:
            for b, tok in enumerate(x[:, -1].tolist()):
                generated[b].append(tok)
        rows = [q(mx.array(encoded[b] + generated[b]), logits[b : b + 1]) if q else logits[b : b + 1]
                for b, q in enumerate(row_procs)]
        return mx.concatenate(rows, axis=0)

    def step(x: mx.array) -> mx.array:
        offset = cache[0].offset
        logits = model(x, cache=cache, mask=padding_mask(pad, offset, x.shape[1]))[:, -1, :]  # (B, V)
        if any(row_procs):
            logits = constrain(x, logits)
        if greedy:  # the argmax needs no normalising (B x V exps: ~7 ms a step at B=8 on CPU)
            return mx.argmax(logits, axis=-1)
        return sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))  # (B,)

    while tokens.shape[1] > 1:  # all but the last position: the vocabulary projection runs on one row
        n = min(prefill_step_size, tokens.shape[1] - 1)
        chunk, tokens = tokens[:, :n], tokens[:, n:]
        offset = cache[0].offset
        model(chunk, cache=cache, mask=padding_mask(pad, offset, chunk.shape[1]))
        mx.eval([c.state for c in cache])

    eos = set(tokenizer.eos_token_ids)
    detoks = [tokenizer.detokenizer for _ in range(B)]
    matchers = [StopMatcher(stop) for _ in range(B)]
    outputs = [""] * B
    done = [False] * B
    y = step(tokens)
    for n in range(max_tokens):
        next_y = step(y[:, None]) if n + 1 < max_tokens else None
        if next_y is not None:
            mx.async_eval(next_y)
        for b, tok in enumerate(y.tolist()):
            if done[b]:
                continue
            if tok in eos:
                detoks[b].finalize()
                outputs[b] += matchers[b].feed(detoks[b].last_segment)[0] + matchers[b].flush()
                done[b] = True
                continue
            detoks[b].add_token(tok)
            text, stopped = matchers[b].feed(detoks[b].last_segment)
            outputs[b] += text
            done[b] = stopped
        if all(done) or next_y is None:
            break
        y = next_y
    for b in range(B):
        if not done[b]:
            detoks[b].finalize()
            text, stopped = matchers[b].feed(detoks[b].last_segment)
            outputs[b] += text + ("" if stopped else matchers[b].flush())
    return outputs
