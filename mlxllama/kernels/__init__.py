"""The native quantized matmul for MLX's CPU backend (the C++ extension `_qmm`, built by setup.py).

`quantized_matmul(x, w, scales, biases, group_size, bits)` equals
`mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size, bits)` (affine mode) for
float32 x, multi-threaded and vectorised. `KernelQuantizedLinear` / `KernelQuantizedEmbedding` are
nn.QuantizedLinear / nn.QuantizedEmbedding that use it where it applies (same parameters, so
saving, LoRA and mlx-lm see ordinary quantized layers). `decode_layers` runs a model's blocks for
one token as three native operations each (decode.cpp; models.backend.CPUBackend.layers calls it).
Without the extension (no compiler at install time, or MLXLLAMA_NO_KERNEL=1) everything falls back
to MLX's own operations.
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


SCALE_DTYPES = (mx.float32, mx.float16, mx.bfloat16)  # what the kernel reads scales and biases as


def _scales_readable(layer) -> bool:
    """Whether the kernel reads the layer's scales and biases as they are."""
    biases = layer.get("biases")
    return biases is not None and layer["scales"].dtype in SCALE_DTYPES and biases.dtype == layer["scales"].dtype


def _applies(layer, x: mx.array) -> bool:
    return x.dtype == mx.float32 and _scales_readable(layer)


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
    """nn.QuantizedEmbedding whose as_linear (tied output head) runs the native kernel; its rows come
    out in float32 however the scales are stored (the CPU computes in float32)."""

    def __call__(self, x: mx.array) -> mx.array:
        if self["scales"].dtype == mx.float32 or self.get("biases") is None:
            return super().__call__(x)
        return mx.dequantize(self["weight"][x], scales=self["scales"][x], biases=self["biases"][x],
                             group_size=self.group_size, bits=self.bits, mode=self.mode, dtype=mx.float32)

    def as_linear(self, x: mx.array) -> mx.array:
        if not _applies(self, x):
            return super().as_linear(x)
        return quantized_matmul(x, self["weight"], self["scales"], self["biases"], self.group_size, self.bits)


def _kernel_linear(m) -> bool:
    """A bias-free KernelQuantizedLinear the fused decode can read."""
    return type(m) is KernelQuantizedLinear and "bias" not in m and _scales_readable(m)


def _block_weights(block):
    """(weights, group sizes, bits) of a TransformerBlock the fused decode runs, or None. (Modules
    are dicts: plain lookups here, as this runs for every block at every token.)"""
    attn, mlp = block.get("self_attn"), block.get("mlp")
    norm_in, norm_post = block.get("input_layernorm"), block.get("post_attention_layernorm")
    if attn is None or mlp is None or norm_in is None or norm_post is None or norm_in.eps != norm_post.eps:
        return None
    projs = (attn.get("qkv_proj"), attn.get("o_proj"), mlp.get("gate_up_proj"), mlp.get("down_proj"))
    weights = [norm_in.get("weight")]
    for i, p in enumerate(projs):
        if not _kernel_linear(p):
            return None
        if i == 2:
            weights.append(norm_post.get("weight"))
        weights += [p.get("weight"), p.get("scales"), p.get("biases")]
    if weights[0] is None or weights[7] is None or weights[0].dtype != mx.float32 or weights[7].dtype != mx.float32:
        return None
    return weights, [p.group_size for p in projs], [p.bits for p in projs]


def decode_layers(blocks, x: mx.array, caches, rope_rows) -> mx.array | None:
    """Llama-family TransformerBlocks (stacked projections, kernel-quantized, no biases) for one
    token (x (1, 1, D) float32) with plain KVCaches, as 3 native CPU operations per block that also
    write the token's keys and values into the caches; None when a block or the inputs are of
    another kind (the caller then runs the blocks operation by operation)."""
    if _qmm is None or x.dtype != mx.float32 or x.shape[:2] != (1, 1) or rope_rows is None or not blocks:
        return None
    attn = blocks[0].self_attn
    H, Hkv = attn.n_heads, attn.n_kv_heads
    cos, sin = rope_rows
    Dh = cos.size
    if cos.dtype != mx.float32 or sin.dtype != mx.float32:
        return None
    layers, group_sizes, bits = [], [], []
    for block in blocks:
        found = _block_weights(block)
        a = block.self_attn
        if found is None or (a.n_heads, a.n_kv_heads, a.scale) != (H, Hkv, attn.scale):
            return None
        layers.append(found[0])
        group_sizes.append(found[1])
        bits.append(found[2])
    offset = caches[0].offset
    for c in caches:
        if c.offset != offset or (c.keys is not None and (c.keys.dtype != mx.float32 or c.keys.shape[0] != 1)):
            return None
    for c in caches:
        if c.keys is None or offset >= c.keys.shape[2]:
            grow = mx.zeros((1, Hkv, 1, Dh), mx.float32)
            c._grow(grow, grow, 1)
    keys, values = [c.keys for c in caches], [c.values for c in caches]
    for c in caches:
        c.keys = c.values = None  # the old buffers: held by the graph only, so they are written in place
    try:
        outs = _qmm.decode_layers(x, layers, keys, values, cos, sin, H, Hkv, Dh,
                                  blocks[0].input_layernorm.eps, attn.scale, group_sizes, bits, offset)
    except BaseException:
        for c, k, v in zip(caches, keys, values):
            c.keys, c.values = k, v
        raise
    del keys, values
    L = len(blocks)
    for c, k, v in zip(caches, outs[1 : 1 + L], outs[1 + L :]):
        c.keys, c.values = k, v
        c.offset += 1
    return outs[0]


def use_kernel(model: nn.Module, scale_dtype: mx.Dtype | None = None) -> int:
    """Switches the model's eligible quantized layers to the kernel in place. scale_dtype (float16 or
    bfloat16: the checkpoint's) puts their scales and biases back in that type, which the kernel reads
    directly (fewer bytes per token than float32; exact, since they were only widened); other values
    leave the parameters untouched. Returns how many layers now use it; idempotent."""
    if _qmm is None:
        return 0
    count = 0
    half = scale_dtype if scale_dtype is not None and scale_dtype in (mx.float16, mx.bfloat16) else None
    for _, m in model.named_modules():
        if half is not None and isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and \
                m.get("biases") is not None and supports(m.bits, m.group_size, getattr(m, "mode", "affine")):
            m.scales, m.biases = m.scales.astype(half), m.biases.astype(half)
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
