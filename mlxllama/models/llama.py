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
import numpy as np

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
        for name in (*self.REQUIRED, "num_key_value_heads", *(("head_dim",) if self.head_dim is not None else ())):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive whole number, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
            if self.head_dim < 1:
                raise ValueError(f"hidden_size {self.hidden_size} is smaller than num_attention_heads")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise ValueError(f"rope_scaling must be an object or null, got {self.rope_scaling!r}")

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
        # not a parameter, so load's mx.eval(model.parameters()) skips it: evaluate it here, on the
        # building thread (a lazy array evaluated first on another thread, like the server's, fails)
        mx.eval(self._freqs)

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
    def for_args(cls, args: "ModelArgs") -> "RopeTable | None":
        if args.rope_traditional:
            return None
        d = args.head_dim
        inv_freq = args.rope_theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
        scaling = args.rope_scaling or {}
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type in ("default", None):
            return cls(inv_freq)
        if rope_type == "linear":
            return cls(inv_freq, 1 / scaling["factor"])
        if rope_type == "llama3":
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


def stack_linears(layers: list[nn.Module]) -> nn.Module | None:
    """One layer computing all of `layers` (same input) by stacking their output rows; None when
    they cannot be stacked (a LoRA wrapper, different quantization, bias on some only)."""
    kinds = {nn.QuantizedLinear if isinstance(m, nn.QuantizedLinear) else type(m) for m in layers}
    if len(kinds) != 1 or kinds.pop() not in (nn.Linear, nn.QuantizedLinear):
        return None
    has_bias = {"bias" in m for m in layers}
    if len(has_bias) != 1:
        return None
    bias = has_bias.pop()
    first = layers[0]
    out_dims = sum(m.weight.shape[0] for m in layers)
    if isinstance(first, nn.QuantizedLinear):
        quant = {(m.group_size, m.bits, getattr(m, "mode", "affine"), m.get("biases") is None) for m in layers}
        if len(quant) != 1:
            return None
        in_dims = first.weight.shape[1] * 32 // first.bits
        # the constructor's random weights are lazy and replaced before anything evaluates them
        stacked = nn.QuantizedLinear(in_dims, out_dims, bias, first.group_size, first.bits,
                                    getattr(first, "mode", "affine"))
        stacked.weight = mx.concatenate([m.weight for m in layers])
        stacked.scales = mx.concatenate([m.scales for m in layers])
        if first.get("biases") is not None:
            stacked.biases = mx.concatenate([m.biases for m in layers])
    else:
        stacked = nn.Linear(first.weight.shape[1], out_dims, bias=bias)
        stacked.weight = mx.concatenate([m.weight for m in layers])
    if bias:
        stacked.bias = mx.concatenate([m.bias for m in layers])
    return stacked


def split_linear(stacked: nn.Module, sizes: list[int]) -> list[nn.Module]:
    """The inverse of stack_linears: layers with output rows `sizes`, in order."""
    bounds = np.cumsum([0, *sizes]).tolist()
    parts = []
    for lo, hi in zip(bounds, bounds[1:]):
        if isinstance(stacked, nn.QuantizedLinear):
            in_dims = stacked.weight.shape[1] * 32 // stacked.bits
            m = nn.QuantizedLinear(in_dims, hi - lo, "bias" in stacked, stacked.group_size, stacked.bits,
                                  getattr(stacked, "mode", "affine"))
            m.weight, m.scales = stacked.weight[lo:hi], stacked.scales[lo:hi]
            if stacked.get("biases") is not None:
                m.biases = stacked.biases[lo:hi]
        else:
            m = nn.Linear(stacked.weight.shape[1], hi - lo, bias="bias" in stacked)
            m.weight = stacked.weight[lo:hi]
        if "bias" in stacked:
            m.bias = stacked.bias[lo:hi]
        parts.append(m)
    return parts


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

    def stack(self) -> bool:
        """q, k and v projections -> one qkv_proj (one matmul per step instead of three)."""
        if "qkv_proj" in self:
            return False
        stacked = stack_linears([self.q_proj, self.k_proj, self.v_proj])
        if stacked is None:
            return False
        del self.q_proj, self.k_proj, self.v_proj
        self.qkv_proj = stacked
        return True

    def unstack(self) -> None:
        if "qkv_proj" in self:
            self.q_proj, self.k_proj, self.v_proj = split_linear(self.qkv_proj, self._qkv_sizes())
            del self.qkv_proj

    def _qkv_sizes(self) -> list[int]:
        total = self.qkv_proj.weight.shape[0]
        Dh = total // (self.n_heads + 2 * self.n_kv_heads)
        return [self.n_heads * Dh, self.n_kv_heads * Dh, self.n_kv_heads * Dh]

    def _project(self, x: mx.array, offset, rope_rows) -> tuple[mx.array, mx.array, mx.array]:
        """Queries (B, H, L, Dh) and keys (B, Hkv, L, Dh) rotated to their positions, values."""
        B, L, _ = x.shape
        H, Hkv = self.n_heads, self.n_kv_heads
        if "qkv_proj" in self:
            qkv = self.qkv_proj(x).reshape(B, L, H + 2 * Hkv, -1)  # (B, L, H + 2Hkv, Dh)
            v = qkv[:, :, H + Hkv :].transpose(0, 2, 1, 3)
            if rope_rows is not None:  # q and k rotated together
                qk = apply_rope_table(qkv[:, :, : H + Hkv], *rope_rows).transpose(0, 2, 1, 3)
            else:
                qk = self.rope(qkv[:, :, : H + Hkv].transpose(0, 2, 1, 3), offset=offset)
            return qk[:, :H], qk[:, H:], v
        q = self.q_proj(x).reshape(B, L, H, -1)
        k = self.k_proj(x).reshape(B, L, Hkv, -1)
        v = self.v_proj(x).reshape(B, L, Hkv, -1).transpose(0, 2, 1, 3)
        if rope_rows is not None:
            return (apply_rope_table(q, *rope_rows).transpose(0, 2, 1, 3),
                    apply_rope_table(k, *rope_rows).transpose(0, 2, 1, 3), v)
        q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)
        return self.rope(q, offset=offset), self.rope(k, offset=offset), v

    def __call__(self, x: mx.array, mask: mx.array | str | None = None, cache: Any = None,
                 rope_rows: tuple[mx.array, mx.array] | None = None) -> mx.array:
        """rope_rows: the RopeTable's (cos, sin) for these positions, or None for self.rope."""
        B, L, _ = x.shape
        offset = cache.offset if cache is not None else 0
        q, k, v = self._project(x, offset, rope_rows)  # (B, H, L, Dh), (B, Hkv, L, Dh) x 2
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # (B, Hkv, S, Dh)
        if getattr(cache, "bits", None):  # a quantized KV cache: (packed, scales, biases) triples
            out = quantized_attention(q, k, v, self.scale, mask, cache.group_size, cache.bits)
        elif host_ops.wanted(q, cache):  # prompt chunks on CPU: NumPy's exp is ~15x faster
            out = host_ops.attention(q, k, v, self.scale, mask)  # (B, H, L, Dh)
        else:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)  # (B, H, L, Dh)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))  # (B, L, D)


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


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        D, F = args.hidden_size, args.intermediate_size
        self.gate_proj = nn.Linear(D, F, bias=args.mlp_bias)
        self.up_proj = nn.Linear(D, F, bias=args.mlp_bias)
        self.down_proj = nn.Linear(F, D, bias=args.mlp_bias)

    def stack(self) -> bool:
        """gate and up projections -> one gate_up_proj."""
        if "gate_up_proj" in self:
            return False
        stacked = stack_linears([self.gate_proj, self.up_proj])
        if stacked is None:
            return False
        del self.gate_proj, self.up_proj
        self.gate_up_proj = stacked
        return True

    def unstack(self) -> None:
        if "gate_up_proj" in self:
            F = self.gate_up_proj.weight.shape[0] // 2
            self.gate_proj, self.up_proj = split_linear(self.gate_up_proj, [F, F])
            del self.gate_up_proj

    def __call__(self, x: mx.array, host: bool = False) -> mx.array:
        if "gate_up_proj" in self:
            gate_up = self.gate_up_proj(x)  # (B, L, 2F)
            F = gate_up.shape[-1] // 2
            gate, up = gate_up[..., :F], gate_up[..., F:]
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        if host:  # a prompt chunk on CPU (host_ops.wanted): SiLU by NumPy
            return self.down_proj(host_ops.swiglu(gate, up))
        return self.down_proj(nn.silu(gate) * up)  # SwiGLU, (B, L, D)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask=None, cache=None, rope_rows=None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache, rope_rows)
        if host_ops.wanted(h, cache, axis=1):
            return h + self.mlp(self.post_attention_layernorm(h), host=True)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self._rope_table = RopeTable.for_args(args)  # a plain attribute: not a parameter

    def rope_rows(self, offset, length: int, dtype: mx.Dtype):
        """The rotary table rows for positions offset.. on CPU, or None to use mx.fast.rope (a GPU
        kernel; also the path for array offsets, such as per-row positions, and the traditional
        layout)."""
        table = self._rope_table
        if table is None or mx.default_device() != mx.cpu or not isinstance(offset, int):
            return None
        return table(offset, length, dtype)

    def prepare(self, tokens: mx.array, cache=None, mask=None, rope_rows=None):
        """Embeddings (B, L, D) and what every block needs: its caches, the mask, the rotary rows."""
        h = self.embed_tokens(tokens)  # (B, L, D)
        cache = cache if cache is not None else [None] * len(self.layers)
        if mask is None and h.shape[1] > 1:
            mask = causal_mask(h.shape[1], cache[0])
        if rope_rows is None:
            offset = cache[0].offset if cache[0] is not None else 0
            rope_rows = self.rope_rows(offset, h.shape[1], h.dtype)
        return h, cache, mask, rope_rows

    def __call__(self, tokens: mx.array, cache=None, mask=None, rope_rows=None) -> mx.array:
        h, cache, mask, rope_rows = self.prepare(tokens, cache, mask, rope_rows)
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c, rope_rows)
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

    def __call__(self, tokens: mx.array, cache=None, mask=None, rope_rows=None) -> mx.array:
        """rope_rows: precomputed RopeTable rows (cos, sin) for these positions (the compiled step
        passes them in); None picks them, or mx.fast.rope, by itself."""
        h = self.model(tokens, cache, mask, rope_rows)  # (B, L, D)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)  # (B, L, V)
        return self.lm_head(h)

    @property
    def layers(self):
        return self.model.layers

    def stack_projections(self) -> int:
        """Stacks q/k/v and gate/up into one matmul each, for inference (weights unchanged; the
        parameter names change, so LoRA and saving call unstack_projections first). Returns how
        many groups were stacked; groups that cannot be (LoRA-wrapped, mixed quantization) stay."""
        return sum(int(layer.self_attn.stack()) + int(layer.mlp.stack()) for layer in self.layers)

    def fuse_projections(self) -> int:
        """Deprecated name of stack_projections."""
        import warnings

        warnings.warn("Model.fuse_projections is now stack_projections", DeprecationWarning, stacklevel=2)
        return self.stack_projections()

    def unstack_projections(self) -> None:
        """Back to the checkpoint's separate q/k/v and gate/up layers (exact)."""
        for layer in self.layers:
            layer.self_attn.unstack()
            layer.mlp.unstack()

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
