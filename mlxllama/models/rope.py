"""Rotary position embeddings by config: default, linear scaling, Llama-3 frequency scaling."""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn


class Llama3RoPE(nn.Module):
    """RoPE with Llama-3 frequency scaling (rope_type "llama3")."""

    def __init__(self, dims: int, base: float, traditional: bool, scaling: dict[str, Any]):
        super().__init__()
        self.dims, self.traditional = dims, traditional
        factor = scaling["factor"]
        low_freq_factor = scaling.get("low_freq_factor", 1.0)
        high_freq_factor = scaling.get("high_freq_factor", 4.0)
        old_context_len = scaling.get("original_max_position_embeddings", 8192)
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor

        freqs = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)  # (Dh/2,) periods / 2pi
        wavelens = 2 * math.pi * freqs
        freqs = mx.where(wavelens > low_freq_wavelen, freqs * factor, freqs)
        is_medium = (wavelens > high_freq_wavelen) & (wavelens < low_freq_wavelen)
        smooth = (old_context_len / wavelens - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smooth_freqs = freqs / ((1 - smooth) / factor + smooth)
        self._freqs = mx.where(is_medium, smooth_freqs, freqs)
        # not a parameter, so load's mx.eval(model.parameters()) skips it: evaluate it here, on the
        # building thread (a lazy array evaluated first on another thread, like the server's, fails)
        mx.eval(self._freqs)

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        return mx.fast.rope(
            x, self.dims, traditional=self.traditional, base=None, scale=1.0, offset=offset, freqs=self._freqs
        )


def rope_type(scaling: dict[str, Any] | None) -> str | None:
    scaling = scaling or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


def make_rope(args) -> nn.Module:
    """The rotary embedding `args` (a ModelArgs) asks for."""
    dims = args.head_dim
    scaling = args.rope_scaling or {}
    kind = rope_type(scaling)
    if kind in ("default", None):
        return nn.RoPE(dims, traditional=args.rope_traditional, base=args.rope_theta)
    if kind == "linear":
        return nn.RoPE(dims, traditional=args.rope_traditional, base=args.rope_theta, scale=1 / scaling["factor"])
    if kind == "llama3":
        return Llama3RoPE(dims, args.rope_theta, args.rope_traditional, scaling)
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")
