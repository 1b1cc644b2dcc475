"""Reading a prompt into a KV cache in chunks: the step every decoding loop starts with."""

from __future__ import annotations

import mlx.core as mx


def prefill(model, tokens: mx.array, cache: list, step: int = 512, after_chunk=None) -> mx.array:
    """Runs all but the last token through the model in chunks, filling the cache; returns the last
    token (1,). Only the cache is evaluated, so the vocabulary projection never runs on these rows."""
    while tokens.size > 1:
        n = min(step, tokens.size - 1)
        model(tokens[:n][None], cache=cache)
        if after_chunk is not None:
            after_chunk()
        mx.eval([c.state for c in cache])
        tokens = tokens[n:]
        mx.clear_cache()
    return tokens
