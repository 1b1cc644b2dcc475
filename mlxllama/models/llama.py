"""Llama-family transformer: llama, mistral and qwen2 from one module, chosen by config fields.

The architecture only; where an operation's fastest form depends on the device (the CPU backend's
rotary table and NumPy softmax/SiLU) the layers call the model's backend (models/backend.py),
chosen once when the model is built. Shapes in comments: B batch, L new tokens, S cached + new
tokens, D hidden size, H query heads, Hkv key/value heads, Dh head dim, F MLP width, V vocabulary.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .backend import Backend, select_backend
from .base import causal_mask, quantized_attention
from .cache import KVCache, RotatingKVCache
from .rope import make_rope
from .stacking import split_linear, stack_linears
from .host_ops import RopeTable, apply_rope_table  # noqa: F401  (importable from here, as before)
from .rope import Llama3RoPE  # noqa: F401

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


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, backend: Backend):
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
        self.backend = backend  # a plain attribute: not a parameter

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
            total = self.qkv_proj.weight.shape[0]
            Dh = total // (self.n_heads + 2 * self.n_kv_heads)
            sizes = [self.n_heads * Dh, self.n_kv_heads * Dh, self.n_kv_heads * Dh]
            self.q_proj, self.k_proj, self.v_proj = split_linear(self.qkv_proj, sizes)
            del self.qkv_proj

    def __call__(self, x: mx.array, mask: mx.array | str | None = None, cache: Any = None,
                 rope_rows: tuple[mx.array, mx.array] | None = None) -> mx.array:
        """rope_rows: the backend's rotary rows (cos, sin) for these positions, or None for self.rope."""
        B, L, _ = x.shape
        H, Hkv = self.n_heads, self.n_kv_heads
        offset = cache.offset if cache is not None else 0

        def rotate(t: mx.array) -> mx.array:  # (B, L, heads, Dh) -> (B, heads, L, Dh) at its positions
            return self.backend.rotate(self.rope, t, offset, rope_rows)

        if "qkv_proj" in self:  # stacked projections: q and k rotate together
            qkv = self.qkv_proj(x).reshape(B, L, H + 2 * Hkv, -1)  # (B, L, H + 2Hkv, Dh)
            qk = rotate(qkv[:, :, : H + Hkv])  # (B, H + Hkv, L, Dh)
            q, k, v = qk[:, :H], qk[:, H:], qkv[:, :, H + Hkv :].transpose(0, 2, 1, 3)
        else:
            q = rotate(self.q_proj(x).reshape(B, L, H, -1))  # (B, H, L, Dh)
            k = rotate(self.k_proj(x).reshape(B, L, Hkv, -1))  # (B, Hkv, L, Dh)
            v = self.v_proj(x).reshape(B, L, Hkv, -1).transpose(0, 2, 1, 3)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # (B, Hkv, S, Dh)
        if getattr(cache, "bits", None):  # a quantized KV cache: (packed, scales, biases) triples
            out = quantized_attention(q, k, v, self.scale, mask, cache.group_size, cache.bits)
        else:
            out = self.backend.attention(q, k, v, self.scale, mask, cache)  # (B, H, L, Dh)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))  # (B, L, D)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, backend: Backend):
        super().__init__()
        D, F = args.hidden_size, args.intermediate_size
        self.gate_proj = nn.Linear(D, F, bias=args.mlp_bias)
        self.up_proj = nn.Linear(D, F, bias=args.mlp_bias)
        self.down_proj = nn.Linear(F, D, bias=args.mlp_bias)
        self.backend = backend

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

    def __call__(self, x: mx.array, cache: Any = None) -> mx.array:
        """cache: the layer's KV cache during inference (the backend may then compute on the host)."""
        if "gate_up_proj" in self:
            gate_up = self.gate_up_proj(x)  # (B, L, 2F)
            F = gate_up.shape[-1] // 2
            gate, up = gate_up[..., :F], gate_up[..., F:]
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)  # (B, L, F)
        return self.down_proj(self.backend.swiglu(gate, up, cache))  # SwiGLU, (B, L, D)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, backend: Backend):
        super().__init__()
        self.self_attn = Attention(args, backend)
        self.mlp = MLP(args, backend)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask=None, cache=None, rope_rows=None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache, rope_rows)
        return h + self.mlp(self.post_attention_layernorm(h), cache)


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs, backend: Backend | None = None):
        super().__init__()
        self.backend = backend or select_backend(args)
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args, self.backend) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def rope_rows(self, offset, length: int, dtype: mx.Dtype):
        """The backend's rotary rows for positions offset.. (CPU), or None to use mx.fast.rope (a GPU
        kernel; also the path for array offsets, such as per-row positions, and the traditional
        layout)."""
        return self.backend.rope_rows(offset, length, dtype)

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
        if cache[0] is not None and (fused := self.backend.layers(self.layers, h, mask, cache, rope_rows)) is not None:
            return self.norm(fused)  # the blocks as native operations (CPU decode)
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c, rope_rows)
        return self.norm(h)


class Model(nn.Module):
    """logits = model(tokens (B, L) int32, cache=model.make_cache()) -> (B, L, V).
    backend: how device-dependent operations run (models.backend; None: select_backend decides)."""

    def __init__(self, args: ModelArgs, backend: Backend | None = None):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = LlamaModel(args, backend)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, tokens: mx.array, cache=None, mask=None, rope_rows=None) -> mx.array:
        """rope_rows: precomputed rotary rows (cos, sin) for these positions (the compiled step
        passes them in); None picks them, or mx.fast.rope, by itself."""
        h = self.model(tokens, cache, mask, rope_rows)  # (B, L, D)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)  # (B, L, V)
        return self.lm_head(h)

    @property
    def layers(self):
        return self.model.layers

    @property
    def backend(self) -> Backend:
        return self.model.backend

    def use_backend(self, backend: Backend) -> None:
        """Runs the model with `backend` from now on (select_backend chose one when it was built)."""
        self.model.backend = backend
        for layer in self.layers:
            layer.self_attn.backend = layer.mlp.backend = backend

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
