"""LoRALinear and the function that puts it into a model (mlx-lm's names, shapes and scale).

    y = linear(x) + scale * (dropout(x) @ lora_a) @ lora_b
    lora_a: (in, r) uniform(+-1/sqrt(in)),  lora_b: (r, out) zeros  -> starts as the base model

The wrapped `linear` is an nn.Linear (float or a dense copy of a quantized layer) or an
nn.QuantizedLinear (QLoRA); either way it stays frozen and only lora_a / lora_b train.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from ..errors import InputError

# The projections of a Llama-family block, relative to `model.layers[i]`.
ALL_KEYS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)
SHORT_KEYS = {k.split(".")[-1].removesuffix("_proj"): k for k in ALL_KEYS}  # "q" -> "self_attn.q_proj"


def linear_dims(linear: nn.Module) -> tuple[int, int]:
    """(input_dims, output_dims) of an nn.Linear or nn.QuantizedLinear."""
    out_dims, in_dims = linear.weight.shape
    if isinstance(linear, nn.QuantizedLinear):
        in_dims = in_dims * 32 // linear.bits
    return in_dims, out_dims


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (parameter names as in mlx-lm)."""

    def __init__(self, linear: nn.Module, rank: int = 8, scale: float = 20.0, dropout: float = 0.0):
        super().__init__()
        if not isinstance(linear, (nn.Linear, nn.QuantizedLinear)):
            raise TypeError(f"LoRALinear wraps nn.Linear or nn.QuantizedLinear, not {type(linear).__name__}")
        in_dims, out_dims = linear_dims(linear)
        self.linear = linear
        self.dropout = nn.Dropout(p=dropout)
        self.scale = scale
        bound = 1 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(in_dims, rank))  # (in, r)
        self.lora_b = mx.zeros((rank, out_dims))  # (r, out)
        self.linear.freeze()

    @property
    def rank(self) -> int:
        return self.lora_a.shape[1]

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)  # (..., out)
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b  # (..., out)
        return y + (self.scale * z).astype(x.dtype)

    def delta(self) -> mx.array:
        """The update to the (out, in) weight: scale * lora_b^T @ lora_a^T, float32."""
        a = self.lora_a.astype(mx.float32)
        b = self.lora_b.astype(mx.float32)
        return (self.scale * b.T) @ a.T  # (out, in)

    def fuse(self, dequantize: bool = False) -> nn.Module:
        """A plain layer holding W + delta; quantized again with the base's settings unless dequantize."""
        base = self.linear
        quantized = isinstance(base, nn.QuantizedLinear)
        if quantized:
            w = mx.dequantize(base.weight, base.scales, base.biases, group_size=base.group_size,
                              bits=base.bits, mode=getattr(base, "mode", "affine"))
        else:
            w = base.weight
        dtype = w.dtype
        in_dims, out_dims = linear_dims(base)
        fused = nn.Linear(in_dims, out_dims, bias="bias" in base)
        fused.weight = (w.astype(mx.float32) + self.delta()).astype(dtype)
        if "bias" in base:
            fused.bias = base.bias
        if quantized and not dequantize:
            fused = nn.QuantizedLinear.from_linear(fused, base.group_size, base.bits,
                                                   mode=getattr(base, "mode", "affine"))
            fused.scales = fused.scales.astype(base.scales.dtype)
            if fused.biases is not None:
                fused.biases = fused.biases.astype(base.biases.dtype)
        return fused


def resolve_keys(keys) -> list[str] | None:
    """Module paths relative to a block. None stays None (every linear layer of the block, as in
    mlx-lm); "q", "q_proj" and "self_attn.q_proj" all name the same projection; a comma list works."""
    if keys is None:
        return None
    if isinstance(keys, str):
        keys = [k.strip() for k in keys.split(",") if k.strip()]
    out = []
    for k in keys:
        k = str(k)
        full = SHORT_KEYS.get(k.removesuffix("_proj"), k) if "." not in k else k
        if full not in out:
            out.append(full)
    if not out:
        raise InputError("no LoRA target modules given (keys is empty)")
    return out


# Projections a fused model (Model.stack_projections) stacks, by the checkpoint's names of the parts.
FUSED_PARTS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def block_linears(block: nn.Module) -> list[str]:
    """Paths of the linear layers inside one block (q, k, v, o, gate, up, down first), by the
    checkpoint's names: a stacked qkv_proj or gate_up_proj counts as its parts."""
    found = [k for k, m in block.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))]
    found = [part for k in found for part in FUSED_PARTS.get(k, (k,))]
    return sorted(found, key=lambda k: (ALL_KEYS.index(k) if k in ALL_KEYS else len(ALL_KEYS), k))


def linear_paths(model: nn.Module) -> set[str]:
    """Full paths of the model's linear layers by the checkpoint's names (stacked ones as parts)."""
    names = set()
    for path, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.QuantizedLinear)):
            continue
        for fused, parts in FUSED_PARTS.items():
            if path == fused or path.endswith("." + fused):
                names.update(path[: len(path) - len(fused)] + part for part in parts)
                break
        else:
            names.add(path)
    return names


def target_layers(model: nn.Module, num_layers: int) -> list[tuple[int, nn.Module]]:
    """The last `num_layers` blocks (all for -1), with their indices."""
    layers = list(model.layers)
    if num_layers == -1:
        num_layers = len(layers)
    if num_layers < 1:
        raise InputError(f"num_layers must be at least 1 (or -1 for all), got {num_layers}")
    if num_layers > len(layers):
        raise InputError(f"num_layers is {num_layers} but the model has only {len(layers)} layers (-1 adapts all)")
    start = len(layers) - num_layers
    return [(start + i, layer) for i, layer in enumerate(layers[start:])]


def layers_prefix(model: nn.Module) -> str:
    """The parameter path of model.layers (e.g. "model.layers"), found by identity."""
    first = model.layers[0]
    for path, m in model.named_modules():
        if m is first:
            return path.rsplit(".", 1)[0]
    raise InputError("cannot find model.layers in the model's module tree")


def apply_lora(model: nn.Module, num_layers: int = 16, rank: int = 8, scale: float = 20.0,
               dropout: float = 0.0, keys=None) -> list[str]:
    """Freezes the model and wraps the target linears of the last `num_layers` blocks.

    Keys follow mlx-lm: paths relative to each block ("self_attn.q_proj"), or top-level paths
    ("lm_head"); None means every linear layer of a block. A key that names no linear layer is an
    error (raised before the model is touched). Returns the full paths of the wrapped modules
    (e.g. "model.layers.29.self_attn.q_proj").
    """
    if rank < 1:
        raise InputError(f"LoRA rank must be at least 1, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise InputError(f"LoRA dropout must be in [0, 1), got {dropout}")
    linear = (nn.Linear, nn.QuantizedLinear)
    keys = resolve_keys(keys)
    available = block_linears(model.layers[-1])
    top_names = linear_paths(model)
    if keys is None:
        keys = available
    for k in keys:
        if k not in available and k not in top_names:
            raise InputError(f"LoRA target {k!r} is not a linear layer of this model "
                             f"(a block has: {', '.join(available)})")
    blocks = target_layers(model, num_layers)
    prefix = layers_prefix(model)
    if hasattr(model, "unstack_projections"):  # adapters attach to the checkpoint's own projections
        model.unstack_projections()
    top = dict(model.named_modules())

    model.freeze()
    wrapped: list[str] = []
    for index, block in blocks:
        found = dict(block.named_modules())
        updates = [(k, LoRALinear(found[k], rank, scale, dropout)) for k in keys if isinstance(found.get(k), linear)]
        if updates:
            block.update_modules(tree_unflatten(updates))
            wrapped += [f"{prefix}.{index}.{k}" for k, _ in updates]
    updates = [(k, LoRALinear(top[k], rank, scale, dropout)) for k in keys if isinstance(top.get(k), linear)]
    if updates:
        model.update_modules(tree_unflatten(updates))
        wrapped += [k for k, _ in updates]
    return wrapped


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {path: m for path, m in model.named_modules() if isinstance(m, LoRALinear)}


def remove_lora(model: nn.Module) -> None:
    """Puts the wrapped base layers back."""
    back = [(path, m.linear) for path, m in lora_modules(model).items()]
    if back:
        model.update_modules(tree_unflatten(back))


def fuse_lora(model: nn.Module, dequantize: bool = False) -> int:
    """Replaces every LoRALinear by its fused layer; returns how many were fused."""
    fused = [(path, m.fuse(dequantize)) for path, m in lora_modules(model).items()]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return len(fused)
