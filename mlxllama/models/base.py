"""Pieces the architecture shares with any attention model: the causal mask, attention over a
quantized KV cache (mlx-lm's models/base.py has both)."""

from __future__ import annotations

import mlx.core as mx


def causal_mask(L: int, cache=None) -> mx.array | str:
    """'causal' while keys are the contiguous history; an explicit mask for a wrapped rotating cache."""
    if cache is not None and hasattr(cache, "make_mask"):
        return cache.make_mask(L)
    return "causal"


def quantized_attention(q: mx.array, k: tuple, v: tuple, scale: float, mask, group_size: int, bits: int) -> mx.array:
    """Attention over quantized keys and values (mx.quantized_matmul, as mlx-lm does): q (B, H, L, Dh),
    k and v (packed, scales, biases) of (B, Hkv, S, .) -> (B, H, L, Dh)."""
    B, H, L, D = q.shape
    Hkv = k[0].shape[1]
    rep = H // Hkv
    q = (q * scale).reshape(B, Hkv, rep, L, D)
    k = tuple(mx.expand_dims(a, 2) for a in k)  # (B, Hkv, 1, S, .)
    v = tuple(mx.expand_dims(a, 2) for a in v)
    scores = mx.quantized_matmul(q, *k, transpose=True, group_size=group_size, bits=bits)  # (B, Hkv, rep, L, S)
    if isinstance(mask, str):
        S = scores.shape[-1]
        mask = mx.arange(S - L, S)[:, None] >= mx.arange(S)[None]  # (L, S)
    if mask is not None:
        if mask.ndim == 4:
            mask = mx.expand_dims(mask, 2)  # (B, 1, 1, L, S)
        scores = mx.where(mask, scores, mx.finfo(scores.dtype).min) if mask.dtype == mx.bool_ else scores + mask
    scores = mx.softmax(scores, axis=-1, precise=True)
    out = mx.quantized_matmul(scores, *v, transpose=False, group_size=group_size, bits=bits)  # (B, Hkv, rep, L, Dh)
    return out.reshape(B, H, L, -1)
