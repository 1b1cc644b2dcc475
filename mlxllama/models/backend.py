"""The seam between the architecture and the device: the few operations whose fastest form depends
on where the model runs, chosen once when the model is built (select_backend).

Backend is plain MLX: what GPUs (Metal, CUDA) run, and the reference for the rest. CPUBackend
(MLX's CPU backend) computes the rotary cos/sin rows once per forward pass by NumPy, because
mx.fast.rope has no CPU kernel, and moves the exp-heavy steps of prompt chunks (attention softmax,
SiLU) to NumPy (models.host_ops). Both give the same numbers to float32 rounding.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .. import device, kernels
from . import host_ops
from .cache import KVCache
from .host_ops import RopeTable, apply_rope_table


class Backend:
    """Plain MLX operations."""

    name = "mlx"

    def rope_rows(self, offset, length: int, dtype: mx.Dtype) -> tuple[mx.array, mx.array] | None:
        """Rotary (cos, sin) rows, each (L, 1, Dh), for positions offset.. of one forward pass,
        or None: each layer's rope module (mx.fast.rope) rotates."""
        return None

    def rotate(self, rope: nn.Module, x: mx.array, offset, rows) -> mx.array:
        """x (B, L, heads, Dh) rotated to its positions -> (B, heads, L, Dh): by the rows when given
        (rope_rows, or the compiled step's inputs), else by the rope module at `offset`."""
        if rows is not None:
            return apply_rope_table(x, *rows).transpose(0, 2, 1, 3)
        return rope(x.transpose(0, 2, 1, 3), offset=offset)

    def layers(self, blocks: list, x: mx.array, mask, caches, rope_rows) -> mx.array | None:
        """All the TransformerBlocks as fused operations (x (B, L, D) -> (B, L, D)), or None: the
        blocks run op by op."""
        return None

    def attention(self, q: mx.array, k: mx.array, v: mx.array, scale: float, mask, cache) -> mx.array:
        """q (B, H, L, Dh), k and v (B, Hkv, S, Dh) -> (B, H, L, Dh)."""
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)

    def swiglu(self, gate: mx.array, up: mx.array, cache) -> mx.array:
        """silu(gate) * up, (B, L, F)."""
        return nn.silu(gate) * up


class CPUBackend(Backend):
    """MLX's CPU backend: host-computed rotary rows, NumPy softmax and SiLU for prompt chunks."""

    name = "cpu"

    def __init__(self, table: RopeTable | None):
        self.table = table  # None: the traditional layout or an unknown scaling, mx.fast.rope's

    def rope_rows(self, offset, length: int, dtype: mx.Dtype):
        # array offsets (per-row positions of a batch) take mx.fast.rope
        if self.table is None or not isinstance(offset, int):
            return None
        return self.table(offset, length, dtype)

    def layers(self, blocks, x, mask, caches, rope_rows):
        # one-token decode with plain KV caches: the native fused blocks (mlxllama.kernels)
        if mask is None and x.shape[1] == 1 and all(type(c) is KVCache for c in caches):
            return kernels.decode_layers(blocks, x, caches, rope_rows)
        return None

    def attention(self, q, k, v, scale, mask, cache):
        if host_ops.wanted(q, cache):  # prompt chunks: NumPy's exp is ~15x faster
            return host_ops.attention(q, k, v, scale, mask)
        return super().attention(q, k, v, scale, mask, cache)

    def swiglu(self, gate, up, cache):
        if host_ops.wanted(gate, cache, axis=1):
            return host_ops.swiglu(gate, up)
        return super().swiglu(gate, up, cache)


def select_backend(args, cpu: bool | None = None) -> Backend:
    """The backend for a model of `args` (a ModelArgs): CPUBackend where device.host_paths() says
    so (cpu=None) or cpu=True, else plain MLX."""
    if cpu is None:
        cpu = device.host_paths()
    return CPUBackend(RopeTable.for_args(args)) if cpu else Backend()
