"""The CPU backend's host-side pieces (used through models.backend.CPUBackend): the exp-heavy
steps of prompt processing (softmax, SiLU) and the rotary table, done by NumPy.

MLX's Linux CPU backend computes exp one element at a time (measured here: about 20 ns per element
of CPU time, against about 1.3 ns for NumPy's vectorised exp). A prompt chunk needs H x L x S of
them per layer in the attention softmax and L x F in the MLP's SiLU: at 512 tokens of the 135M
model that was about 60% of the prefill's CPU time. Here the matmuls stay in MLX (BLAS) and only
those element-wise steps move to NumPy, which means evaluating mid-graph: fine for prompt chunks,
no use for one-token decode steps.

Used only when the caller passes a KV cache (inference, never under autograd or mx.compile), in
float32, with at least MIN_QUERIES positions, by a model built for the CPU device; everything else
keeps MLX's ops.

mx.fast.rope has no CPU kernel either: RopeTable computes the cos and sin rows of a forward pass
once and apply_rope_table rotates with five cheap MLX ops.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .rope import Llama3RoPE, rope_type

MIN_QUERIES = 16


def wanted(x: mx.array, cache, axis: int = 2) -> bool:
    """Whether `x` (queries (B, H, L, Dh), or activations (B, L, F) with axis=1) goes to NumPy
    (the caller runs on the CPU device)."""
    return x.shape[axis] >= MIN_QUERIES and cache is not None and x.dtype == mx.float32  # decode stops first


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


class RopeTable:
    """cos and sin rows of the rotary angles for the positions of one forward pass, by NumPy in
    float64.

    On the CPU backend mx.fast.rope has no kernel: each call rebuilds the angles and takes cos and
    sin of every element (about 140 us for one decode token's queries of SmolLM2, 12 ms for a
    512-token chunk). Here the model computes (L, Dh) rows once per forward pass (microseconds for
    a decode step) and each layer's rotation is five cheap ops: x * cos + roll_half(x) * sin with
    the sign folded into sin. Nothing is cached, so memory stays flat however far positions go
    (a rotating KV cache). Only the "half-split" layout (rope_traditional false, the Hugging Face
    one) is covered.
    """

    def __init__(self, inv_freq: np.ndarray, scale: float = 1.0):
        self.inv_freq = np.asarray(inv_freq, dtype=np.float64) * scale  # (Dh/2,) radians per position

    @classmethod
    def for_args(cls, args) -> "RopeTable | None":
        """The table for a ModelArgs' rotary settings; None where it does not apply."""
        if args.rope_traditional:
            return None
        d = args.head_dim
        inv_freq = args.rope_theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
        scaling = args.rope_scaling or {}
        kind = rope_type(scaling)
        if kind in ("default", None):
            return cls(inv_freq)
        if kind == "linear":
            return cls(inv_freq, 1 / scaling["factor"])
        if kind == "llama3":
            return cls(1 / np.array(Llama3RoPE(d, args.rope_theta, False, scaling)._freqs, dtype=np.float64))
        return None

    def __call__(self, offset: int, length: int, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
        """(cos, sin) for positions offset .. offset + length - 1, each (length, 1, Dh)."""
        angles = np.arange(offset, offset + length, dtype=np.float64)[:, None] * self.inv_freq  # (L, Dh/2)
        cos, sin = np.cos(angles), np.sin(angles)
        cos = np.concatenate([cos, cos], axis=1)[:, None, :]  # (L, 1, Dh)
        sin = np.concatenate([-sin, sin], axis=1)[:, None, :]
        return mx.array(cos.astype(np.float32), dtype=dtype), mx.array(sin.astype(np.float32), dtype=dtype)


def apply_rope_table(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """x (B, L, heads, Dh) rotated by the table rows cos, sin (L, 1, Dh)."""
    half = x.shape[-1] // 2
    rolled = mx.concatenate([x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rolled * sin
