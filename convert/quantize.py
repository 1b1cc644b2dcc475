"""Affine quantization choices: bits and group size per module, mixed recipes, error measurement."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from mlxllama.errors import InputError

from .architecture import is_quantizable, layer_index

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
# recipe -> (bits for most modules, bits for the sensitive ones), in the spirit of llama.cpp's Q4_K_M
RECIPES = {"mixed_2_6": (2, 6), "mixed_3_6": (3, 6), "mixed_4_6": (4, 6), "mixed_3_4": (3, 4)}


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int

    def as_dict(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits}


def check_bits(bits: int, group_size: int) -> None:
    if bits not in BITS:
        raise InputError(f"bits must be one of {', '.join(map(str, BITS))}, got {bits}")
    if group_size not in GROUP_SIZES:
        raise InputError(f"group_size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")


def dtype_of(name: str | None, where: str = "dtype"):
    if name not in DTYPES:
        raise InputError(f"{where} must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


class Plan:
    """Decides, tensor by tensor, the target quantization: a QuantSpec, False (eligible, left float) or None."""

    def __init__(self, *, bits: int, group_size: int, quantize: bool, recipe: str | None,
                 dequantize: bool, keep_packed: bool, num_layers: int):
        if recipe is not None and recipe not in RECIPES:
            raise InputError(f"unknown recipe {recipe!r} (known: {', '.join(RECIPES)})")
        self.default = QuantSpec(bits, group_size)
        self.quantize, self.recipe, self.dequantize = quantize, recipe, dequantize
        self.keep_packed, self.num_layers = keep_packed, num_layers

    def spec_for(self, name: str) -> QuantSpec:
        if self.recipe is None:
            return self.default
        low, high = RECIPES[self.recipe]
        module = name.rsplit(".", 1)[0]
        if module.endswith(("embed_tokens", "lm_head")):
            return QuantSpec(high, self.default.group_size)
        index, n = layer_index(name), self.num_layers
        if index is not None and module.endswith(("v_proj", "down_proj")):
            if index < n // 8 or index >= 7 * n // 8 or (index - n // 8) % 3 == 2:
                return QuantSpec(high, self.default.group_size)
        return QuantSpec(low, self.default.group_size)

    def target(self, name: str, shape: tuple[int, ...], packed: QuantSpec | None,
               hint: QuantSpec | None = None) -> QuantSpec | bool | None:
        """packed: the tensor's existing quantization; hint: what to use when keeping the source's own
        (a QuantSpec, or False to leave it float)."""
        if not is_quantizable(name, shape) or self.dequantize:
            return None
        if packed is not None and (self.keep_packed or not self.quantize):
            return packed
        if not self.quantize:
            return None
        if hint is not None and self.keep_packed:
            if hint is False:  # the source keeps it float
                return False
            spec = hint
        else:
            spec = self.spec_for(name)
        if shape[-1] % spec.group_size:
            return False
        return spec


def quantize(w: mx.array, spec: QuantSpec) -> tuple[mx.array, mx.array, mx.array]:
    """(weight uint32 packed, scales, biases) in the dtype of w."""
    return mx.quantize(w, group_size=spec.group_size, bits=spec.bits, mode="affine")


def dequantize(w: mx.array, scales: mx.array, biases: mx.array, spec: QuantSpec) -> mx.array:
    return mx.dequantize(w, scales, biases, group_size=spec.group_size, bits=spec.bits, mode="affine")


def packed_spec(weight_shape, scales_shape, in_dims: int) -> QuantSpec | None:
    """Recover (bits, group_size) of a packed weight from its shapes; None if they make no sense."""
    bits, rem = divmod(weight_shape[-1] * 32, in_dims)
    if rem or scales_shape[-1] == 0:
        return None
    group_size, rem2 = divmod(in_dims, scales_shape[-1])
    if rem2 or bits not in BITS or group_size not in (*GROUP_SIZES, 16):
        return None
    return QuantSpec(bits, group_size)


def quantization_error(w: mx.array, bits: int, group_size: int) -> float:
    """Relative RMS error ||w - deq(q(w))|| / ||w|| of affine quantization of w (computed in float32)."""
    w = w.astype(mx.float32)
    spec = QuantSpec(bits, group_size)
    w_hat = dequantize(*quantize(w, spec), spec)
    return (mx.linalg.norm(w - w_hat) / mx.maximum(mx.linalg.norm(w), 1e-30)).item()
