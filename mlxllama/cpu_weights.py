"""How a quantized checkpoint's layers run on MLX's CPU backend (one place decides).

Three forms, same math (dequantized weights are exactly the values the quantized matmul uses):
- "kernel": the layers stay quantized and run the native kernel (mlxllama.kernels): a 4-bit model
  stays 4-bit in memory and decodes faster than dense float32 (fewer bytes read per token);
  prompts (many rows) go through dequantized tiles and the same BLAS sgemm as the dense form.
- "dense": float32 copies of the dequantized weights, multiplied by BLAS. Used for training (LoRA's
  backward pass runs on the float weights), on request (`--dense`), and when the kernel is missing.
- "quantized": MLX's own quantized matmul (GPUs; or a CPU model too big for a dense copy and no
  kernel). On macOS / Metal nothing here changes anything: the CPU rules apply to the CPU only.
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from . import kernels

_prefer_dense = False  # set by the CLI's --dense for the process


def prefer_dense(value: bool = True) -> None:
    """Makes dense the CPU form for loads that do not choose (dense=None), as `--dense` does."""
    global _prefer_dense
    _prefer_dense = value


def dense_fits(model: nn.Module, budget_fraction: float = 0.25) -> bool:
    """Whether float32 copies of the quantized layers fit in a quarter of RAM."""
    params = sum(
        m.weight.shape[0] * m.weight.shape[1] * 32 // m.bits
        for _, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    )
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return False
    return params * 4 <= budget_fraction * total


def _kernel_supports(m: nn.Module) -> bool:
    return kernels.supports(m.bits, m.group_size, getattr(m, "mode", "affine"))


def dequantize_layers(model: nn.Module, dtype: mx.Dtype, only=None) -> None:
    """Replaces quantized layers (those `only(module)` accepts, default all) by dense ones holding
    exactly the dequantized values."""
    replacements = []
    for path, m in model.named_modules():
        if only is not None and isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and not only(m):
            continue
        if isinstance(m, nn.QuantizedLinear):
            w = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits).astype(dtype)
            dense = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
            dense.weight = w
            if "bias" in m:
                dense.bias = m.bias
            replacements.append((path, dense))
        elif isinstance(m, nn.QuantizedEmbedding):
            w = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits).astype(dtype)
            dense = nn.Embedding(w.shape[0], w.shape[1])
            dense.weight = w
            replacements.append((path, dense))
    if replacements:
        model.update_modules(tree_unflatten(replacements))


def has_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())


def choose(model: nn.Module, dense: bool | None, dtype: mx.Dtype, train: bool = False) -> str:
    """"kernel", "dense" or "quantized" for this model's quantized layers.
    dense: True forces dense, False keeps them quantized, None decides (train: for LoRA)."""
    if not has_quantized(model):
        return "quantized"
    on_cpu = mx.default_device() == mx.cpu and dtype == mx.float32
    if dense is None and _prefer_dense:
        dense = True
    if dense:
        return "dense"
    if not on_cpu:
        return "quantized"
    if dense is None and train:
        return "dense" if dense_fits(model) else "quantized"
    if kernels.available():
        return "kernel"
    kernels.tell_fallback_once()
    if dense is None and dense_fits(model):
        return "dense"
    return "quantized"


def apply(model: nn.Module, form: str, dtype: mx.Dtype) -> None:
    """Puts the model's quantized layers in `form` (see choose). In "kernel" form, layers the kernel
    cannot run (3, 5, 6 bits) are made dense when that fits."""
    if form == "dense":
        dequantize_layers(model, dtype)
    elif form == "kernel":
        if dense_fits(model):
            dequantize_layers(model, dtype, only=lambda m: not _kernel_supports(m))
        kernels.use_kernel(model)
