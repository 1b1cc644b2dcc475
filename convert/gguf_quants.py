"""GGML quantization blocks -> MLX affine quantization (w = scale * q + bias, groups of 32).

Exact repacking where a GGML block is affine per 32 values:
  Q4_0  w = d (q - 8)            Q4_1  w = d q + m           Q8_0  w = d (q - 128), q unsigned
  Q5_0  w = d (q - 16)           Q5_1  w = d q + m
  Q4_K / Q5_K  w = (d sc_j) q - (dmin m_j) for each 32-value sub-block j
The integer levels q are copied as they are; the scale and bias become the group's MLX scale and
bias (exact in float32, rounded once when stored as float16).

Everything else gguf-py can dequantize (16-value sub-blocks: Q6_K, Q3_K, Q2_K; non-linear grids:
IQ4_NL, IQ4_XS, IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S) is not affine per 32 values: it is
dequantized with gguf-py's reference math and re-quantized at REQUANT_BITS (or kept float).
"""

from __future__ import annotations

import math

import numpy as np
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

GROUP = 32
EXACT_BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q4_K": 4, "Q5_K": 5}
# bits of the MLX group-32 re-quantization per type, measured in docs/converting.md
REQUANT_BITS = {"Q6_K": 8, "Q3_K": 5, "Q2_K": 4, "IQ4_NL": 6, "IQ4_XS": 6, "IQ3_XXS": 5, "IQ3_S": 5,
                "IQ2_XXS": 5, "IQ2_XS": 5, "IQ2_S": 5}
FLOAT = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}
_CHUNK = 1 << 20  # values per step when converting big tensors (bounds the temporaries)


def _f16(b: np.ndarray) -> np.ndarray:
    """(n, 2) uint8 -> (n, 1) float32."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16k) bytes -> (n, 32k) levels: per 16-byte run, the 16 low nibbles then the 16 high ones."""
    n = qs.shape[0]
    qs = qs.reshape(n, -1, 1, 16)
    return np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, -1)


def _high_bits(qh: np.ndarray, count: int) -> np.ndarray:
    """(n, 4) little-endian bit masks -> (n, 32) bits 0/1."""
    return np.unpackbits(qh, axis=-1, bitorder="little")[:, :count]


def _k_scales(scales: np.ndarray, d: np.ndarray, dmin: np.ndarray):
    sc, m = quants.Q4_K.get_scale_min(scales)
    return d * sc.astype(np.float32), -dmin * m.astype(np.float32)


def _q4_0(b):
    d = _f16(b[:, 0:2])
    return _nibbles(b[:, 2:18]), d, -8 * d


def _q4_1(b):
    return _nibbles(b[:, 4:20]), _f16(b[:, 0:2]), _f16(b[:, 2:4])


def _q5_0(b):
    d = _f16(b[:, 0:2])
    return _nibbles(b[:, 6:22]) | (_high_bits(b[:, 2:6], 32) << 4), d, -16 * d


def _q5_1(b):
    return _nibbles(b[:, 8:24]) | (_high_bits(b[:, 4:8], 32) << 4), _f16(b[:, 0:2]), _f16(b[:, 2:4])


def _q8_0(b):
    d = _f16(b[:, 0:2])
    return (b[:, 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8), d, -128 * d


def _q4_k(b):
    n = b.shape[0]
    scale, bias = _k_scales(b[:, 4:16], _f16(b[:, 0:2]), _f16(b[:, 2:4]))
    qs = b[:, 16:144].reshape(n, 4, 1, 32)  # 4 runs of 32 bytes: low nibbles sub-block 2i, high 2i+1
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, 256)
    return q, scale, bias


def _q5_k(b):
    n = b.shape[0]
    scale, bias = _k_scales(b[:, 4:16], _f16(b[:, 0:2]), _f16(b[:, 2:4]))
    qs = b[:, 48:176].reshape(n, 4, 1, 32)
    low = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32)
    qh = b[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)  # bit j of byte i
    return (low | ((qh & 1) << 4)).reshape(n, 256), scale, bias


_EXACT = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0, "Q4_K": _q4_k, "Q5_K": _q5_k}


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """MLX's packing: levels (rows, cols) as a little-endian bit stream in uint32 words."""
    rows, cols = q.shape
    p = 8 // math.gcd(8, bits)  # values per whole number of bytes
    g = q.reshape(rows, cols // p, p).astype(np.uint64)
    v = np.zeros(g.shape[:2], np.uint64)
    for k in range(p):
        v |= g[..., k] << np.uint64(k * bits)
    b = v.view(np.uint8).reshape(rows, cols // p, 8)[..., :p * bits // 8]
    return np.ascontiguousarray(b).reshape(rows, -1).view(np.uint32)


def _row_chunks(rows: int, cols: int):
    step = max(1, _CHUNK // max(cols, 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def repack(raw: np.ndarray, ttype: str, shape: tuple[int, int]):
    """Raw bytes (rows, bytes per row) of an exact type -> (packed uint32, scales f32, biases f32)."""
    rows, cols = shape
    bits, block_bytes = EXACT_BITS[ttype], GGML_QUANT_SIZES[GGMLQuantizationType[ttype]][1]
    words = np.empty((rows, cols * bits // 32), np.uint32)
    scales = np.empty((rows, cols // GROUP), np.float32)
    biases = np.empty((rows, cols // GROUP), np.float32)
    for a, z in _row_chunks(rows, cols):
        blocks = np.ascontiguousarray(raw[a:z]).reshape(-1, block_bytes)
        q, s, b = _EXACT[ttype](blocks)
        words[a:z] = pack(q.reshape(z - a, cols), bits)
        scales[a:z] = s.reshape(z - a, -1)
        biases[a:z] = b.reshape(z - a, -1)
    return words, scales, biases


def dequantize(raw: np.ndarray, ttype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Raw bytes -> float32 values of `shape` (gguf-py's reference math; floats as they are)."""
    if ttype in FLOAT:
        a = np.ascontiguousarray(raw).view(FLOAT[ttype])
        if ttype == "BF16":
            a = (a.astype(np.uint32) << 16).view(np.float32)
        return a.astype(np.float32, copy=False).reshape(shape)
    rows = math.prod(shape[:-1])
    out = np.empty((rows, shape[-1]), np.float32)
    qtype = GGMLQuantizationType[ttype]
    for a, z in _row_chunks(rows, shape[-1]):
        out[a:z] = quants.dequantize(np.ascontiguousarray(raw[a:z]), qtype)
    return out.reshape(shape)


def can_dequantize(ttype: str) -> bool:
    return ttype in FLOAT or ttype in EXACT_BITS or ttype in REQUANT_BITS
