"""Read a safetensors header without loading tensors: names, dtypes, shapes, and a truncation check.

File layout: an 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the data.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from mlxllama.errors import WeightsError

_MAX_HEADER = 100 * 2**20  # the format's own limit is 100 MB
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
               "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # "F32", "F16", "BF16", "U32", ...
    shape: tuple[int, ...]
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Names -> TensorInfo for one safetensors file; WeightsError naming the file if unreadable or truncated."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightsError(f"truncated safetensors file {path}: {size} bytes, no header")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise WeightsError(f"truncated or corrupt safetensors file {path}: header of {n} bytes, file of {size}")
            raw = f.read(n)
    except OSError as e:
        raise WeightsError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WeightsError(f"corrupt safetensors file {path}: header is not JSON") from None
    if not isinstance(header, dict):
        raise WeightsError(f"corrupt safetensors file {path}: header is not a JSON object")
    header.pop("__metadata__", None)
    out: dict[str, TensorInfo] = {}
    end = 0
    for name, info in header.items():
        try:
            begin, stop = (int(x) for x in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
            dtype = str(info["dtype"])
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"corrupt safetensors file {path}: bad header entry for {name!r}") from None
        if begin < 0 or stop < begin or any(d < 0 for d in shape):
            raise WeightsError(f"corrupt safetensors file {path}: bad offsets or shape for {name!r}")
        if dtype not in DTYPE_BYTES:
            raise WeightsError(f"safetensors file {path}: tensor {name!r} has unknown dtype {dtype!r}")
        count = 1
        for d in shape:
            count *= d
        if count * DTYPE_BYTES[dtype] != stop - begin:
            raise WeightsError(f"corrupt safetensors file {path}: tensor {name!r} has shape {list(shape)} of {dtype} "
                               f"({count * DTYPE_BYTES[dtype]} bytes) but {stop - begin} bytes of data")
        out[name] = TensorInfo(dtype, shape, stop - begin)
        end = max(end, stop)
    if 8 + n + end > size:
        raise WeightsError(f"truncated safetensors file {path}: expected {8 + n + end} bytes, found {size}")
    return out
