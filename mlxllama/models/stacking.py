"""Stacking linear layers that read the same input into one (q/k/v, gate/up): one matmul per
group instead of two or three, the weights unchanged. Works on dense, quantized and kernel
layers alike (KernelQuantizedLinear is an nn.QuantizedLinear)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np


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
