"""Prompt processing on the CPU backend with its exp-heavy steps (softmax, SiLU) done by NumPy.

MLX's Linux CPU backend computes exp one element at a time (measured here: about 20 ns per element
of CPU time, against about 1.3 ns for NumPy's vectorised exp). A prompt chunk needs H x L x S of
them per layer in the attention softmax and L x F in the MLP's SiLU: at 512 tokens of the 135M
model that was about 60% of the prefill's CPU time. Here the matmuls stay in MLX (BLAS) and only
those element-wise steps move to NumPy, which means evaluating mid-graph: fine for prompt chunks,
no use for one-token decode steps.

Used only when the caller passes a KV cache (inference, never under autograd or mx.compile), on
the CPU device, in float32, with at least MIN_QUERIES positions; everything else keeps MLX's ops.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

MIN_QUERIES = 16


def wanted(x: mx.array, cache, axis: int = 2) -> bool:
    """Whether `x` (queries (B, H, L, Dh), or activations (B, L, D) with axis=1) goes to NumPy."""
    return (x.shape[axis] >= MIN_QUERIES and cache is not None and x.dtype == mx.float32
            and mx.default_device() == mx.cpu)  # cheapest test first: decode steps stop there


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up, (B, L, F)."""
    g, u = np.array(gate), np.array(up)
    with np.errstate(over="ignore"):  # exp(-g) = inf for very negative g gives silu = -0, as it should
        e = np.exp(-g)
    e += 1.0
    np.divide(g, e, out=e)
    e *= u
    return mx.array(e)


def _mask_array(mask, B: int, Hkv: int, rep: int, L: int, S: int) -> np.ndarray | None:
    """The mask as a NumPy array broadcastable to (B, Hkv, rep, L, S): bool (True: attend) or
    additive; None when its shape is not one attention masks have here."""
    if isinstance(mask, str):  # "causal": query i sits at position S - L + i
        return np.tril(np.ones((L, S), dtype=bool), k=S - L)
    m = np.array(mask)
    if m.ndim <= 2:
        return m
    if m.ndim == 4 and m.shape[1] == 1:
        return m[:, :, None]  # (B, 1, 1, L, S)
    if m.ndim == 4 and m.shape[1] == Hkv * rep:
        return m.reshape(m.shape[0], Hkv, rep, L, S)
    return None


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask=None) -> mx.array:
    """Same contract as mx.fast.scaled_dot_product_attention: q (B, H, L, Dh), k and v
    (B, Hkv, S, Dh), mask None / "causal" / bool or additive array -> (B, H, L, Dh)."""
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    rep = H // Hkv
    m = _mask_array(mask, B, Hkv, rep, L, S) if mask is not None else None
    if mask is not None and m is None:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    scores = (q * scale).reshape(B, Hkv, rep * L, D) @ k.swapaxes(-1, -2)  # (B, Hkv, rep*L, S)
    s = np.array(scores).reshape(B, Hkv, rep, L, S)
    if m is not None:
        s = np.where(m, s, -np.inf) if m.dtype == np.bool_ else s + m
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    p = mx.array(s.reshape(B, Hkv, rep * L, S))
    return (p @ v).reshape(B, H, L, v.shape[-1])
