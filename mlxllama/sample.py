"""Samplers and logits processors as small pure functions.

sampler(logprobs (B, V)) -> tokens (B,)     processor(tokens (L,) or (B, L), logits (B, V)) -> logits
Randomness is explicit: a sampler made with a seed owns its PRNG key and splits it per call.
"""

from __future__ import annotations

import math
from typing import Callable

import mlx.core as mx

from .generation_options import OPTIONS

Sampler = Callable[[mx.array], mx.array]
Processor = Callable[[mx.array, mx.array], mx.array]


def check_sampling(temp: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                   repetition_penalty: float | None = None, presence_penalty: float = 0.0,
                   frequency_penalty: float = 0.0, repetition_context_size: int = 20) -> None:
    """Raises InputError naming the first out-of-range value (ranges: generation_options.OPTIONS)."""
    for name, value in (("temp", temp), ("top_p", top_p), ("top_k", top_k), ("min_p", min_p),
                        ("repetition_penalty", repetition_penalty), ("presence_penalty", presence_penalty),
                        ("frequency_penalty", frequency_penalty), ("repetition_context_size", repetition_context_size)):
        OPTIONS[name].check(value)


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)  # (B,)


def apply_top_k(logprobs: mx.array, k: int) -> mx.array:
    if k <= 0 or k >= logprobs.shape[-1]:
        return logprobs
    kth = mx.sort(logprobs, axis=-1)[..., -k][..., None]  # (B, 1)
    return mx.where(logprobs >= kth, logprobs, -mx.inf)


def apply_top_p(logprobs: mx.array, p: float) -> mx.array:
    """Keeps the smallest set of tokens whose probability mass reaches p."""
    if p >= 1.0:
        return logprobs
    order = mx.argsort(-logprobs, axis=-1)  # (B, V) descending
    sorted_lp = mx.take_along_axis(logprobs, order, axis=-1)
    probs = mx.softmax(sorted_lp, axis=-1)
    cum_before = mx.cumsum(probs, axis=-1) - probs  # mass strictly before each token
    keep_sorted = cum_before < p
    keep = mx.zeros_like(keep_sorted)
    keep = mx.put_along_axis(keep, order, keep_sorted, axis=-1)
    return mx.where(keep, logprobs, -mx.inf)


def apply_min_p(logprobs: mx.array, min_p: float) -> mx.array:
    """Drops tokens whose probability is below min_p times the top token's."""
    if min_p <= 0:
        return logprobs
    top = mx.max(logprobs, axis=-1, keepdims=True)
    return mx.where(logprobs >= top + math.log(min_p), logprobs, -mx.inf)


def make_sampler(temp: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                 seed: int | None = None) -> Sampler:
    """Greedy at temperature 0; otherwise top-k, top-p and min-p filtering then categorical sampling."""
    check_sampling(temp, top_p, top_k, min_p)
    if temp == 0:
        return greedy
    state = {"key": mx.random.key(seed) if seed is not None else None}

    def sample(logprobs: mx.array) -> mx.array:
        lp = apply_min_p(apply_top_p(apply_top_k(logprobs, top_k), top_p), min_p)
        if state["key"] is None:
            return mx.random.categorical(lp * (1 / temp), axis=-1)
        state["key"], sub = mx.random.split(state["key"])
        return mx.random.categorical(lp * (1 / temp), axis=-1, key=sub)

    return sample


def make_repetition_penalty(penalty: float, context_size: int = 20) -> Processor:
    """CTRL-style penalty on tokens seen in the last context_size positions."""

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens.size == 0:
            return logits
        recent = tokens[..., -min(context_size, tokens.shape[-1]):]  # a window past the start is all of it
        recent = recent.reshape(logits.shape[0], -1) if recent.ndim == 2 or logits.shape[0] == 1 else recent
        picked = mx.take_along_axis(logits, recent, axis=-1)
        picked = mx.where(picked < 0, picked * penalty, picked / penalty)
        return mx.put_along_axis(logits, recent, picked, axis=-1)

    return process


def make_presence_frequency_penalty(presence: float, frequency: float, prompt_tokens: int = 0) -> Processor:
    """OpenAI's penalties: logit[j] -= frequency * c[j] + presence * (c[j] > 0), where c[j] counts
    token j among the generated tokens: `tokens` minus its first `prompt_tokens` (the prompt)."""

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        generated = tokens.reshape(-1)[prompt_tokens:]  # (n,) one sequence's tokens so far
        if generated.size == 0:
            return logits
        counts = mx.zeros((logits.shape[-1],), dtype=logits.dtype).at[generated].add(1)  # (V,) c[j]
        return logits - (frequency * counts + presence * (counts > 0).astype(logits.dtype))

    return process


def make_logit_bias(bias: dict[int, float]) -> Processor:
    ids = mx.array(list(bias.keys()), dtype=mx.int32)
    values = mx.array(list(bias.values()), dtype=mx.float32)

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        return logits.at[:, ids].add(values.astype(logits.dtype))

    return process


def make_logits_processors(logit_bias: dict[int, float] | None = None, repetition_penalty: float | None = None,
                           repetition_context_size: int = 20, presence_penalty: float = 0.0,
                           frequency_penalty: float = 0.0, prompt_tokens: int = 0) -> list[Processor]:
    """The processors these settings ask for (none for neutral values). prompt_tokens: how many of
    the tokens a processor sees are the prompt, which the presence and frequency penalties skip
    (OpenAI counts only generated tokens); the repetition penalty looks at the last
    repetition_context_size tokens, prompt included (as mlx-lm and llama.cpp do)."""
    check_sampling(repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                   frequency_penalty=frequency_penalty, repetition_context_size=repetition_context_size)
    processors = []
    if logit_bias:
        processors.append(make_logit_bias(logit_bias))
    if repetition_penalty is not None and repetition_penalty != 1.0:
        processors.append(make_repetition_penalty(repetition_penalty, repetition_context_size))
    if presence_penalty or frequency_penalty:
        processors.append(make_presence_frequency_penalty(presence_penalty, frequency_penalty, prompt_tokens))
    return processors
