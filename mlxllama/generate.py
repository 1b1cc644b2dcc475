"""Generation in layers: generate_step (tokens) -> stream_generate (response records) -> generate (text)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import mlx.core as mx

from . import device
from .engine.batch import padding_mask  # noqa: F401  (re-exported: part of the public module)
from .engine.text import StopMatcher, TextStream  # noqa: F401
from .errors import InputError
from .generation_options import checked
from .memory import peak_memory_gb
from .prefill import prefill  # noqa: F401  (re-exported: part of the public module)
from .models import Model, make_cache
from .models.cache import QuantizedKVCache, check_kv_quantization, maybe_quantize
from .sample import Processor, Sampler, greedy, make_logits_processors, make_sampler


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


def check_kv(model, kv_bits: int | None, kv_group_size: int = 64, max_kv_size: int | None = None) -> None:
    """InputError for KV quantization settings this model cannot use."""
    if kv_bits is None:
        return
    head_dim = getattr(getattr(model, "args", None), "head_dim", None)
    try:
        check_kv_quantization(kv_bits, kv_group_size, head_dim)
    except ValueError as e:
        raise InputError(str(e)) from None
    if max_kv_size is not None:
        raise InputError("kv_bits cannot be combined with max_kv_size (a rotating cache is not quantized)")


def check_prompt(model, n_prompt: int, cache: list | None, max_kv_size: int | None) -> None:
    if n_prompt == 0:
        raise InputError("the prompt is empty")
    limit = context_length(model)
    used = n_prompt + (cache[0].offset if cache else 0)
    if limit and max_kv_size is None and used > limit:
        raise InputError(f"the prompt is {used} tokens, longer than the model's context of {limit} tokens")


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
    compiled: bool | None = False,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 0,
) -> Iterator[tuple[int, mx.array]]:
    """Yields (token, logprobs (V,)) pairs. The next step is queued before the current token is
    handed out (mx.async_eval), so the host never waits on the device between tokens.
    compiled=True decodes with one mx.compile'd graph per step (mlxllama.compiled) where the model
    and cache allow it (our models, no prompt_cache, no max_kv_size, no kv_bits); None: where it
    pays on this device (device.compiled_step_default: GPUs).
    kv_bits: store keys and values quantized (4 or 8 bits, groups of kv_group_size) once the cache
    holds quantized_kv_start positions; the caller's prompt_cache list is updated in place."""
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
            maybe_quantize(cache, kv_bits, kv_group_size, quantized_kv_start)
        if processors:
            history = mx.concatenate([history, y]) if history is not None and history is not y else y
            for p in processors:
                logits = p(history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if sampler is greedy:  # the same token without V exps (logprobs stay lazy: computed if read)
            return mx.argmax(logits, axis=-1), logprobs.squeeze(0)
        return sampler(logprobs), logprobs.squeeze(0)

    y = prefill(model, prompt.astype(mx.int32), cache, prefill_step_size,
                lambda: maybe_quantize(cache, kv_bits, kv_group_size, quantized_kv_start))
    if processors:
        history = prompt[: prompt.size - y.size]
    y, logprobs = step(y)
    mx.async_eval(y)
    if compiled is None:
        compiled = device.compiled_step_default()
    if compiled and prompt_cache is None and max_kv_size is None and kv_bits is None and max_tokens > 1:
        from .compiled import CompiledForward, supports_compiled_step

        if supports_compiled_step(model):
            forward = CompiledForward(model, cache)
    n = 0
    while True:
        if n != max_tokens:
            next_y, next_logprobs = step(y)
            mx.async_eval(next_y)
        if n == 0:
            mx.eval(y)
        if n == max_tokens:
            break
        yield y.item(), logprobs
        if n % 256 == 0:
            mx.clear_cache()
        y, logprobs = next_y, next_logprobs
        n += 1


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
        bits, group, start = kwargs.pop("kv_bits", None), kwargs.pop("kv_group_size", 64), kwargs.pop("quantized_kv_start", 0)
        if bits is not None:  # the speculative step writes the cache it is given: make it quantized
            cache = kwargs.get("prompt_cache")
            if cache is None and start == 0 and isinstance(model, Model):
                kwargs["prompt_cache"] = [QuantizedKVCache(group, bits) for _ in model.layers]
            elif cache is not None:
                maybe_quantize(cache, bits, group, start)
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


@checked
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
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
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
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 0,
) -> Iterator[GenerationResponse]:
    """Yields a GenerationResponse per token; the last one carries finish_reason.
    lookup_context: tokens before `prompt` that prompt lookup may draft from as well, typically
    what `prompt_cache` already holds (a document, earlier chat turns).
    response_format: constrains the output (mlxllama.constrain): a JSON schema dict, a Pydantic
    model class, {"type": "json_object"}, {"type": "regex", "regex": ...}, a Grammar or Constraint.
    kv_bits (4 or 8): a quantized KV cache from quantized_kv_start positions on."""
    check_kv(model, kv_bits, kv_group_size, max_kv_size)
    constraint = format_processor(tokenizer, response_format, bool(draft_model is not None or prompt_lookup))
    tokens = encode_prompt(tokenizer, prompt)
    check_prompt(model, tokens.size, prompt_cache, max_kv_size)
    sampler = sampler or make_sampler(temp, top_p, top_k, min_p, seed)
    processors = (logits_processors or []) + make_logits_processors(
        logit_bias, repetition_penalty, repetition_context_size, presence_penalty, frequency_penalty,
        prompt_tokens=tokens.size)
    if constraint is not None:
        processors.append(constraint)  # last: nothing after it can give a masked token weight again
    if seed is not None:
        mx.random.seed(seed)
    text_stream = TextStream(tokenizer, stop, max_tokens)
    n_prompt = tokens.size

    tic = time.perf_counter()
    prompt_tps, n = 0.0, 0
    steps = token_iterator(
        tokens, model, draft_model=draft_model, prompt_lookup=prompt_lookup, num_draft_tokens=num_draft_tokens,
        lookup_context=lookup_context, max_tokens=max_tokens, sampler=sampler, logits_processors=processors,
        max_kv_size=max_kv_size, prompt_cache=prompt_cache, prefill_step_size=prefill_step_size, compiled=compiled,
        kv_bits=kv_bits, kv_group_size=kv_group_size, quantized_kv_start=quantized_kv_start,
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
        text, reason = text_stream.add(token)
        yield record(text, token, logprobs, reason, from_draft)
        if reason is not None:
            return
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


@checked(also=stream_generate)
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
# Batched generation: several prompts on the batched engine (mlxllama.engine).


@checked
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
    samplers: Sequence[Sampler | None] | None = None,
    logits_processors: Sequence[list[Processor] | None] | None = None,
    max_batch: int | None = None,
    prefix_cache=None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 0,
    response_format: Any = None,
) -> list[str]:
    """Generates for several prompts at once; each stops on its own EOS, stop string or max_tokens.
    samplers / logits_processors: one per prompt (None entries: the shared settings); max_batch:
    how many are decoded together (default: all); prefix_cache: an engine.PrefixCache to reuse
    and fill; response_format: one format for every prompt, or a list with one per prompt (None:
    free text), enforced by a per-row constraint processor."""
    from .engine import BatchEngine

    encoded = [encode_prompt(tokenizer, p).tolist() for p in prompts]
    formats = list(response_format) if isinstance(response_format, (list, tuple)) else [response_format] * len(encoded)
    if len(formats) != len(encoded):
        raise InputError(f"response_format has {len(formats)} entries for {len(encoded)} prompts")
    for toks in encoded:
        check_prompt(model, len(toks), None, None)
    check_kv(model, kv_bits, kv_group_size)
    if not encoded:
        return []
    row_constraints = [format_processor(tokenizer, f) for f in formats]
    engine = BatchEngine(model, tokenizer, max_batch=max_batch or len(encoded), prefill_step=prefill_step_size,
                         prefix_cache=prefix_cache, kv_bits=kv_bits, kv_group_size=kv_group_size,
                         quantized_kv_start=quantized_kv_start)
    uids = {}
    for i, toks in enumerate(encoded):
        row_sampler = samplers[i] if samplers is not None and samplers[i] is not None else sampler
        if row_sampler is None:
            row_seed = None if seed is None else seed + i
            row_sampler = make_sampler(temp, top_p, top_k, min_p, row_seed)
        processors = list(logits_processors[i] or []) if logits_processors is not None else []
        if row_constraints[i] is not None:
            processors.append(row_constraints[i])  # last: nothing after it can give a masked token weight again
        uids[engine.add(toks, max_tokens=max_tokens, sampler=row_sampler, logits_processors=processors or None,
                        stop=stop)] = i
    outputs = [""] * len(encoded)
    while engine.has_work:
        for out in engine.step():
            outputs[uids[out.uid]] += out.text
    return outputs
