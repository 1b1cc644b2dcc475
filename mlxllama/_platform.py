"""Device facts that must be settled before `import mlx.core`.

On Linux the `mlx[cpu]` wheel links the reference BLAS (about 4 GFLOP/s here). Loading an optimized
library that exports the standard CBLAS symbols into the global symbol scope before MLX is imported
makes MLX's float32 matmul use it (measured: MKL 155-300 GFLOP/s, vector-matrix 24-48 GB/s). This
module does that once, on Linux only; on macOS (Accelerate) it does nothing.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

_BLAS: str | None = None


def _candidates() -> list[str]:
    roots = {sys.prefix, sys.base_prefix, os.path.dirname(os.path.dirname(sys.executable))}
    found = []
    for root in roots:
        found += sorted(glob.glob(os.path.join(root, "lib", "libmkl_rt.so*")))
    return found


def loaded_blas() -> str | None:
    """The library load_blas loaded, or None (MLX's own BLAS; macOS: Accelerate)."""
    return _BLAS


def load_blas() -> str | None:
    """Load MKL's CBLAS globally (Linux, x86-64). Returns the library path or None."""
    global _BLAS
    if _BLAS is not None or not sys.platform.startswith("linux"):
        return _BLAS
    if "mlx.core" in sys.modules:  # too late: MLX already bound its BLAS symbols
        return None
    if os.environ.get("MLXLLAMA_NO_BLAS"):
        return None
    for path in _candidates():
        # Threading layer: Intel OpenMP when present (both cores), else sequential.
        layer = "INTEL" if glob.glob(os.path.join(os.path.dirname(path), "libiomp5.so")) else "SEQUENTIAL"
        os.environ.setdefault("MKL_THREADING_LAYER", layer)
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        _BLAS = path
        return path
    return None


load_blas()
