"""Puts a quantized checkpoint's layers in the form they run in on MLX's CPU backend.

Which form is mlxllama.device's decision (device.weights_form); this module carries it out.
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

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from . import kernels
from .device import dense_fits, has_quantized, prefer_dense  # noqa: F401  (this module's API before device.py)
from .device import weights_form as choose  # noqa: F401  (the old name of device.weights_form)


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


def apply(model: nn.Module, form: str, dtype: mx.Dtype, scale_dtype: mx.Dtype | None = None) -> None:
    """Puts the model's quantized layers in `form` (device.weights_form). In "kernel" form, layers the kernel
    cannot run (3, 5, 6 bits) are made dense when that fits, and the kernel's layers keep their scales
    and biases in `scale_dtype` (the checkpoint's half type, when it has one)."""
    if form == "dense":
        dequantize_layers(model, dtype)
    elif form == "kernel":
        if dense_fits(model):
            dequantize_layers(model, dtype, only=lambda m: not _kernel_supports(m))
        kernels.use_kernel(model, scale_dtype)


def checkpoint_scale_dtype(weights: dict[str, mx.array]) -> mx.Dtype | None:
    """The type a checkpoint stores its quantization scales in (None: not quantized)."""
    return next((w.dtype for k, w in weights.items() if k.endswith(".scales")), None)
