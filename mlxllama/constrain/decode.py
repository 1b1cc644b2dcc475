"""Decoding under a constraint with fast-forward: tokens the grammar forces are not sampled.

After each sampled token the matcher is asked which tokens must come next (llguidance's
fast-forward tokens, e.g. `", "age": ` between two JSON fields). They are handed out at once and
read by the model together with the sampled token in one call, so a run of k forced tokens costs
one model call instead of k, and no mask or sampling for them. A forced token's logprobs are the
constrained distribution: 0 for the token, -inf elsewhere.
"""

from __future__ import annotations

from typing import Iterator

import mlx.core as mx

from ..models import make_cache
from ..models.cache import maybe_quantize
from .matcher import ConstraintProcessor


def find_constraint(processors) -> ConstraintProcessor | None:
    return next((p for p in processors or [] if isinstance(p, ConstraintProcessor)), None)


def fast_forward_generate_step(prompt: mx.array, model, *, constraint: ConstraintProcessor, max_tokens: int = 256,
                               sampler=None, logits_processors=None, max_kv_size: int | None = None,
                               prompt_cache: list | None = None, prefill_step_size: int = 512,
                               kv_bits: int | None = None, kv_group_size: int = 64, quantized_kv_start: int = 0,
                               **_ignored) -> Iterator[tuple[int, mx.array]]:
    """generate_step's contract (yields (token, logprobs (V,))) for a constrained sequence."""
    from ..prefill import prefill
    from ..sample import make_sampler

    sampler = sampler or make_sampler()
    others = [p for p in logits_processors or [] if p is not constraint]
    cache = prompt_cache if prompt_cache is not None else make_cache(model, max_kv_size)
    inputs = prefill(model, prompt.astype(mx.int32), cache, prefill_step_size,  # (1,) the last prompt token
                     lambda: maybe_quantize(cache, kv_bits, kv_group_size, quantized_kv_start))
    history = prompt.astype(mx.int32)
    n = 0
    while n < max_tokens:
        logits = model(inputs[None], cache=cache)[:, -1, :]  # (1, V)
        maybe_quantize(cache, kv_bits, kv_group_size, quantized_kv_start)
        for p in others:
            logits = p(history, logits)
        logits = constraint.mask(logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = sampler(logprobs)
        mx.eval(token, logprobs)
        tok = token.item()
        yield tok, logprobs.squeeze(0)
        n += 1
        constraint.advance([tok])
        if constraint.finished or n == max_tokens:
            return  # an EOS ends the sequence; stream_generate stops there
        forced = constraint.forced()[: max_tokens - n]
        for f in forced:
            yield f, mx.where(mx.arange(logits.shape[-1]) == f, 0.0, -mx.inf)
            n += 1
        if forced:
            constraint.advance(forced)
        inputs = mx.array([tok, *forced], dtype=mx.int32)
        if others:
            history = mx.concatenate([history, inputs])
