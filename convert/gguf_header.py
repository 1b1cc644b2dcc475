"""A minimal GGUF header reader: tensor names, GGML types and shapes, and a truncation check.

`mx.load` reads the tensors and metadata; this only exists to name an unsupported tensor type and to
refuse a truncated file before the C loader reads past its end.
Layout: magic "GGUF", version u32, tensor count u64, kv count u64, the kvs, the tensor infos
(name, n_dims u32, dims u64 x n, type u32, offset u64), padding to `general.alignment`, the data.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from mlxllama.errors import WeightsError

GGML_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
              10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
              17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS",
              24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16"}
# type -> (elements per block, bytes per block)
_BLOCK = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "F64": (1, 8), "I8": (1, 1), "I16": (1, 2),
          "I32": (1, 4), "I64": (1, 8), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22),
          "Q5_1": (32, 24), "Q8_0": (32, 34), "Q8_1": (32, 36), "Q2_K": (256, 84), "Q3_K": (256, 110),
          "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210), "Q8_K": (256, 292)}
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    type: str
    shape: tuple[int, ...]  # numpy/MLX order (GGUF stores dims reversed)


class _Reader:
    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise WeightsError(f"truncated GGUF file {self.path}: header ends early")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise WeightsError(f"truncated GGUF file {self.path}: header ends early")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype == 8:
            return self.string()
        if vtype == 9:
            itype, n = self.take("<I"), self.take("<Q")
            if itype in _SCALAR:  # skip scalar arrays without decoding them
                size = struct.calcsize(_SCALAR[itype]) * n
                if self.pos + size > len(self.buf):
                    raise WeightsError(f"truncated GGUF file {self.path}: header ends early")
                self.pos += size
                return None
            return [self.value(itype) for _ in range(n)]
        if vtype not in _SCALAR:
            raise WeightsError(f"corrupt GGUF file {self.path}: unknown metadata type {vtype}")
        return self.take(_SCALAR[vtype])


def read_gguf_header(path: Path) -> list[GGUFTensorInfo]:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = path.stat().st_size
            if size < 24:
                raise WeightsError(f"truncated GGUF file {path}: {size} bytes")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise WeightsError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        r = _Reader(buf, path)
        if bytes(buf[:4]) != b"GGUF":
            raise WeightsError(f"{path} is not a GGUF file (bad magic)")
        r.pos = 4
        version = r.take("<I")
        if version < 2:
            raise WeightsError(f"{path}: GGUF version {version} is not supported (need 2 or later)")
        n_tensors, n_kv = r.take("<Q"), r.take("<Q")
        alignment = 32
        for _ in range(n_kv):
            key = r.string()
            value = r.value(r.take("<I"))
            if key == "general.alignment" and isinstance(value, int):
                alignment = value
        infos, ends = [], []
        for _ in range(n_tensors):
            name = r.string()
            dims = [r.take("<Q") for _ in range(r.take("<I"))]
            ttype = GGML_TYPES.get(r.take("<I"), "unknown")
            offset = r.take("<Q")
            infos.append(GGUFTensorInfo(name, ttype, tuple(reversed(dims))))
            if ttype in _BLOCK:
                per, nbytes = _BLOCK[ttype]
                count = 1
                for d in dims:
                    count *= d
                ends.append(offset + -(-count // per) * nbytes)
        data_start = -(-r.pos // alignment) * alignment
        if ends and data_start + max(ends) > size:
            raise WeightsError(f"truncated GGUF file {path}: expected {data_start + max(ends)} bytes, found {size}")
        return infos
    finally:
        buf.close()
