"""GGML blocks for tests: real quantizations where gguf-py has a quantizer, else random valid bytes."""

from __future__ import annotations

import numpy as np
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

QUANTIZABLE = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}
# byte offsets of the float16 scale fields in each block (random bytes there would give inf / nan)
F16_FIELDS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q2_K": (80, 82), "Q3_K": (108,), "Q6_K": (208,),
              "IQ4_NL": (0,), "IQ4_XS": (0,), "IQ3_XXS": (0,), "IQ3_S": (0,), "IQ2_XXS": (0,),
              "IQ2_XS": (0,), "IQ2_S": (0,)}


def blocks(ttype: str, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Raw bytes (rows, bytes per row) of a tensor of `shape` in GGML type `ttype`."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    if ttype in QUANTIZABLE:
        return quants.quantize((rng.standard_normal(shape) * 0.05).astype(np.float32), T[ttype])
    per, size = GGML_QUANT_SIZES[T[ttype]]
    raw = rng.integers(0, 256, (rows * cols // per, size), dtype=np.uint8)
    for off in F16_FIELDS[ttype]:
        d = rng.uniform(1e-4, 1e-3, raw.shape[0]).astype(np.float16)
        raw[:, off:off + 2] = d.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)
