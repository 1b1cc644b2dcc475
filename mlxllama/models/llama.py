"""Llama-family transformer: llama, mistral and qwen2 from one module, chosen by config fields.

Shapes in comments: B batch, L new tokens, S cached + new tokens, D hidden size,
H query heads, Hkv key/value heads, Dh head dim, V vocabulary.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from . import host_ops
from .cache import KVCache, RotatingKVCache

# Defaults a model type implies when its config.json does not spell them out.
MODEL_TYPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"tie_word_embeddings": False},
    "qwen2": {"qkv_bias": True},
}
SUPPORTED_MODEL_TYPES = tuple(MODEL_TYPE_DEFAULTS)


@dataclass
class ModelArgs:
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int | None = None
    rope_theta: float = 10000.0
    rope_traditional: bool = False
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # bias on q, k, v and o (llama's flag)
    qkv_bias: bool = False  # bias on q, k, v only (qwen2)
    mlp_bias: bool = False
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    REQUIRED = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size")

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "ModelArgs":
        """Builds args from a config.json dict; unknown keys go to `extra`, missing required keys raise KeyError."""
        params = inspect.signature(cls).parameters
        merged = {**MODEL_TYPE_DEFAULTS.get(config.get("model_type", "llama"), {}), **config}
        missing = [k for k in cls.REQUIRED if merged.get(k) is None]
        if missing:
            raise KeyError(", ".join(missing))
        known = {k: v for k, v in merged.items() if k in params and k != "extra"}
        known.setdefault("model_type", "llama")
        extra = {k: v for k, v in merged.items() if k not in params}
        return cls(**known, extra=extra)


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

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        return mx.fast.rope(
            x, self.dims, traditional=self.traditional, base=None, scale=1.0, offset=offset, freqs=self._freqs
        )


def make_rope(args: ModelArgs) -> nn.Module:
    dims = args.head_dim
    scaling = args.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in ("default", None):
        return nn.RoPE(dims, traditional=args.rope_traditional, base=args.rope_theta)
    if rope_type == "linear":
        return nn.RoPE(dims, traditional=args.rope_traditional, base=args.rope_theta, scale=1 / scaling["factor"])
    if rope_type == "llama3":
        return Llama3RoPE(dims, args.rope_theta, args.rope_traditional, scaling)
    raise ValueError(f"unsupported rope_scaling type {rope_type!r} (supported: default, linear, llama3)")


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        D, self.n_heads, self.n_kv_heads, Dh = (
            args.hidden_size,
            args.num_attention_heads,
            args.num_key_value_heads,
            args.head_dim,
        )
        self.scale = Dh**-0.5
        qkv_bias = args.attention_bias or args.qkv_bias
        self.q_proj = nn.Linear(D, self.n_heads * Dh, bias=qkv_bias)
        self.k_proj = nn.Linear(D, self.n_kv_heads * Dh, bias=qkv_bias)
        self.v_proj = nn.Linear(D, self.n_kv_heads * Dh, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * Dh, D, bias=args.attention_bias)
        self.rope = make_rope(args)

    def __call__(self, x: mx.array, mask: mx.array | str | None = None, cache: Any = None) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)  # (B, H, L, Dh)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)  # (B, Hkv, L, Dh)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)  # (B, Hkv, L, Dh)
        offset = cache.offset if cache is not None else 0
        q = self.rope(q, offset=offset)
        k = self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # (B, Hkv, S, Dh)
        if host_ops.wanted(q, cache):  # prompt chunks on CPU: NumPy's exp is ~15x faster
            out = host_ops.attention(q, k, v, self.scale, mask)  # (B, H, L, Dh)
        else:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)  # (B, H, L, Dh)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))  # (B, L, D)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        D, F = args.hidden_size, args.intermediate_size
        self.gate_proj = nn.Linear(D, F, bias=args.mlp_bias)
        self.up_proj = nn.Linear(D, F, bias=args.mlp_bias)
        self.down_proj = nn.Linear(F, D, bias=args.mlp_bias)

    def __call__(self, x: mx.array, host: bool = False) -> mx.array:
        if host:  # a prompt chunk on CPU (host_ops.wanted): SiLU by NumPy
            return self.down_proj(host_ops.swiglu(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU, (B, L, D)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        if host_ops.wanted(h, cache, axis=1):
            return h + self.mlp(self.post_attention_layernorm(h), host=True)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, tokens: mx.array, cache=None, mask=None) -> mx.array:
        h = self.embed_tokens(tokens)  # (B, L, D)
        cache = cache if cache is not None else [None] * len(self.layers)
        if mask is None and h.shape[1] > 1:
            mask = causal_mask(h.shape[1], cache[0])
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        return self.norm(h)


def causal_mask(L: int, cache=None) -> mx.array | str:
    """'causal' while keys are the contiguous history; an explicit mask for a wrapped rotating cache."""
    if cache is not None and hasattr(cache, "make_mask"):
        return cache.make_mask(L)
    return "causal"


class Model(nn.Module):
    """logits = model(tokens (B, L) int32, cache=model.make_cache()) -> (B, L, V)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = LlamaModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, tokens: mx.array, cache=None, mask=None) -> mx.array:
        h = self.model(tokens, cache, mask)  # (B, L, D)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)  # (B, L, V)
        return self.lm_head(h)

    @property
    def layers(self):
        return self.model.layers

    def make_cache(self, max_kv_size: int | None = None, keep: int = 4) -> list:
        if max_kv_size is not None:
            return [RotatingKVCache(max_kv_size, keep=keep) for _ in self.layers]
        return [KVCache() for _ in self.layers]

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drops checkpoint entries the model does not use (precomputed rotary tables, a tied head)."""
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            for suffix in ("weight", "scales", "biases"):
                weights.pop(f"lm_head.{suffix}", None)
        return weights
