"""Device policy: what the device MLX computes on implies, decided in one place.

- compute dtype (compute_dtype): float32 on the CPU (its backend is 8x slower in bf16, 37x in
  fp16), else the checkpoint's half type;
- how a quantized checkpoint's layers run (weights_form): on the CPU the native kernel
  (mlxllama.kernels), dense float32 copies, or MLX's own quantized matmul; GPUs keep MLX's;
- the model's CPU paths (host_paths): NumPy softmax and SiLU for prompt chunks and the rotary
  table (models.backend.CPUBackend), chosen when a model is built;
- the compiled decode step (compiled_step_default): pays on GPUs; off on the CPU, where decode is
  bound by reading weights and MLX compiles kernels with the system C++ compiler (seconds);
- overlapping decode steps (overlap_steps): queue step n+1 before handing out step n on GPUs;
- memory (memory_bytes, working_set_bytes, wire_memory, wired_limit): the machine's RAM, Metal's
  recommended working set and keeping the model wired there;
- facts for reports and bug reports (kind, blas, facts): the device, the BLAS MLX's float32
  matmul uses on Linux (mlxllama._platform), the native kernel.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from . import _platform  # noqa: F401  (optimized BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn

from . import kernels
from .errors import ConfigError

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}

_prefer_dense = False  # set by the CLI's --dense for the process


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def kind() -> str:
    """"cpu" or "gpu" (Metal or CUDA)."""
    return "cpu" if on_cpu() else "gpu"


def blas() -> str | None:
    """The optimized BLAS library loaded for MLX's CPU backend (Linux), or None: MLX's own."""
    return _platform.loaded_blas()


def facts() -> dict[str, Any]:
    """The device, its BLAS and the native kernel, for reports."""
    return {"device": kind(), "blas": blas() or "mlx's own", "kernel": kernels.info()}


def memory_bytes() -> int | None:
    """Physical memory of the machine, or None when the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def working_set_bytes() -> int | None:
    """Metal's recommended working set (what the GPU can hold without paging), or None elsewhere."""
    if not mx.metal.is_available():
        return None
    return int(mx.metal.device_info()["max_recommended_working_set_size"])


def wire_memory() -> None:
    """On Metal, keep up to the recommended working set wired so the model is not paged out (as
    mlx-lm's server does); elsewhere nothing."""
    limit = working_set_bytes()
    if limit is not None:
        mx.set_wired_limit(limit)


@contextlib.contextmanager
def wired_limit():
    """wire_memory for the duration of a run (as mlx-lm's training does), then the previous limit."""
    limit = working_set_bytes()
    if limit is None:
        yield
        return
    previous = mx.set_wired_limit(limit)
    try:
        yield
    finally:
        mx.set_wired_limit(previous)


# -- what runs where -----------------------------------------------------------------------------

def compute_dtype(weights: dict[str, mx.array], dtype: str | None = None) -> mx.Dtype:
    """`dtype` by name when given; else float32 on CPU (the CPU backend is 8x slower in bf16, 37x
    in fp16), elsewhere the checkpoint's half type (float32 when it has none)."""
    if dtype is not None:
        if dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
        return DTYPES[dtype]
    if on_cpu():
        return mx.float32
    for w in weights.values():
        if w.dtype in (mx.bfloat16, mx.float16):
            return w.dtype
    return mx.float32


def host_paths() -> bool:
    """Whether models built now take the CPU paths (NumPy softmax/SiLU, the rotary table)."""
    return on_cpu()


def compiled_step_default() -> bool:
    """Whether the compiled decode step is worth it here by default: on GPUs yes, on the CPU no."""
    return not on_cpu()


def overlap_steps() -> bool:
    """Whether a decode loop queues step n+1 before handing out the tokens of step n: that hides
    host work behind a GPU; the CPU backend computes most of a step inside async_eval, so there it
    would only hold every token back by one step."""
    return not on_cpu()


# -- quantized layers ----------------------------------------------------------------------------

def prefer_dense(value: bool = True) -> None:
    """Makes dense the CPU form for loads that do not choose (dense=None), as `--dense` does."""
    global _prefer_dense
    _prefer_dense = value


def has_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())


def dense_fits(model: nn.Module, budget_fraction: float = 0.25) -> bool:
    """Whether float32 copies of the quantized layers fit in a quarter of RAM."""
    params = sum(
        m.weight.shape[0] * m.weight.shape[1] * 32 // m.bits
        for _, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    )
    total = memory_bytes()
    return total is not None and params * 4 <= budget_fraction * total


def weights_form(model: nn.Module, dense: bool | None, dtype: mx.Dtype, train: bool = False) -> str:
    """"kernel", "dense" or "quantized" for this model's quantized layers (cpu_weights.apply puts
    them in it). dense: True forces dense, False keeps them quantized, None decides (train: for
    LoRA, whose backward pass runs on dense weights)."""
    if not has_quantized(model):
        return "quantized"
    cpu_rules = on_cpu() and dtype == mx.float32
    if dense is None and _prefer_dense:
        dense = True
    if dense:
        return "dense"
    if not cpu_rules:
        return "quantized"
    if dense is None and train:
        return "dense" if dense_fits(model) else "quantized"
    if kernels.available():
        return "kernel"
    kernels.tell_fallback_once()
    if dense is None and dense_fits(model):
        return "dense"
    return "quantized"
