"""The native quantized matmul for MLX's CPU backend (the C++ extension `_qmm`, built by setup.py).

`quantized_matmul(x, w, scales, biases, group_size, bits)` equals
`mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size, bits)` (affine mode) for
float32 x, multi-threaded and vectorised. `KernelQuantizedLinear` / `KernelQuantizedEmbedding` are
nn.QuantizedLinear / nn.QuantizedEmbedding that use it where it applies (same parameters, so
saving, LoRA and mlx-lm see ordinary quantized layers). Without the extension (no compiler at
install time, or MLXLLAMA_NO_KERNEL=1) everything falls back to MLX's own operation.
"""

from __future__ import annotations

import importlib
import os
import sys

import mlx.core as mx
import mlx.nn as nn



def _load_extension():
    """(module or None, why not)."""
    if os.environ.get("MLXLLAMA_NO_KERNEL"):
        return None, "disabled by MLXLLAMA_NO_KERNEL"
    try:
        return importlib.import_module("._qmm", __name__), ""
    except ImportError as e:  # not built (no compiler at install time) or built for another MLX
        return None, (str(e).splitlines()[0] if str(e) else "not built")


_qmm, _why_missing = _load_extension()
_told = False


def available() -> bool:
    return _qmm is not None


def why_missing() -> str:
    return _why_missing


def tell_fallback_once() -> None:
    """One line on stderr, once per process: the CPU runs quantized layers the slow way."""
    global _told
    if not _told:
        _told = True
        print(f"mlxllama: native CPU quantized matmul unavailable ({_why_missing}); using the slower path",
              file=sys.stderr)


def supports(bits: int, group_size: int, mode: str = "affine") -> bool:
    return _qmm is not None and mode == "affine" and _qmm.supported(bits, group_size)


def quantized_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group_size: int,
                     bits: int) -> mx.array:
    """x (..., K) float32 @ dequantize(w (N, K*bits/32), scales, biases).T -> (..., N)."""
    return _qmm.quantized_matmul(x, w, scales, biases, group_size, bits)


def info() -> dict:
    """What the extension runs with (for `mlxllama bench` and bug reports)."""
    if _qmm is None:
        return {"available": False, "reason": _why_missing}
    return {"available": True, "isa": _qmm.isa(), "threads": _qmm.threads(), "max_rows": _qmm.max_rows()}


def _applies(layer, x: mx.array) -> bool:
    return x.dtype == mx.float32 and layer.get("biases") is not None and layer["scales"].dtype == mx.float32


class KernelQuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear whose float32 forward runs the native kernel."""

    def __call__(self, x: mx.array) -> mx.array:
        if not _applies(self, x):
            return super().__call__(x)
        y = quantized_matmul(x, self["weight"], self["scales"], self["biases"], self.group_size, self.bits)
        if "bias" in self:
            y = y + self["bias"]
        return y


class KernelQuantizedEmbedding(nn.QuantizedEmbedding):
    """nn.QuantizedEmbedding whose as_linear (tied output head) runs the native kernel."""

    def as_linear(self, x: mx.array) -> mx.array:
        if not _applies(self, x):
            return super().as_linear(x)
        return quantized_matmul(x, self["weight"], self["scales"], self["biases"], self.group_size, self.bits)


def use_kernel(model: nn.Module) -> int:
    """Switches the model's eligible quantized layers to the kernel in place (their parameters are
    untouched). Returns how many layers now use it; idempotent."""
    if _qmm is None:
        return 0
    count = 0
    for _, m in model.named_modules():
        mode = getattr(m, "mode", "affine")
        if isinstance(m, KernelQuantizedLinear) or isinstance(m, KernelQuantizedEmbedding):
            count += 1
        elif type(m) is nn.QuantizedLinear and supports(m.bits, m.group_size, mode):
            m.__class__ = KernelQuantizedLinear
            count += 1
        elif type(m) is nn.QuantizedEmbedding and supports(m.bits, m.group_size, mode):
            m.__class__ = KernelQuantizedEmbedding
            count += 1
    return count
