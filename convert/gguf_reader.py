"""Read a GGUF file: its metadata, its tensor table, and each tensor's bytes from a memory map.

Layout: magic "GGUF", version u32, tensor count u64, kv count u64, the kvs, the tensor infos
(name, n_dims u32, dims u64 x n, type u32, offset u64), padding to `general.alignment`, the data.
Everything in the header is checked before a byte of data is read (a truncated file, a wrong magic,
a tensor table pointing past the end, overlapping tensors, duplicate keys or tensor names, an
unknown tensor type, absurd sizes or nesting: one WeightsError line each; fuzzed in
tests/test_fuzz_gguf.py). `GGUFFile.data(t)` maps only that tensor's bytes, so memory follows the tensor being read.
"""

from __future__ import annotations

import itertools
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from mlxllama.errors import WeightsError

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_MAX_DIMS = 4                 # GGML_MAX_DIMS
_MAX_ELEMENTS = 1 << 40       # per tensor: far beyond any model, small enough to catch garbage
_MAX_COUNT = 1 << 24          # tensors / metadata entries
_MAX_NESTING = 8              # arrays of arrays (llama.cpp itself refuses any nesting)


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    type: str                  # GGML type name ("Q4_K", "F16", ...)
    shape: tuple[int, ...]     # numpy/MLX order (GGUF stores dims reversed): (rows, row length)
    offset: int                # absolute byte offset of the data in the file
    nbytes: int


class _Reader:
    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def _need(self, size: int) -> None:
        if size < 0 or self.pos + size > len(self.buf):
            raise WeightsError(f"truncated GGUF file {self.path}: header ends early")

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        self._need(size)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("<Q")
        self._need(n)
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int, depth: int = 0):
        if vtype == 8:
            return self.string()
        if vtype == 9:
            itype, n = self.take("<I"), self.take("<Q")
            if itype in _NUMPY:
                size = np.dtype(_NUMPY[itype]).itemsize * n
                self._need(size)
                a = np.frombuffer(self.buf, dtype=np.dtype(_NUMPY[itype]).newbyteorder("<"), count=n,
                                  offset=self.pos).copy()
                self.pos += size
                return a
            if n > len(self.buf):
                raise WeightsError(f"corrupt GGUF file {self.path}: metadata array of {n} items")
            if itype == 9 and depth >= _MAX_NESTING:
                raise WeightsError(f"corrupt GGUF file {self.path}: metadata arrays nested more than "
                                   f"{_MAX_NESTING} deep")
            return [self.value(itype, depth + 1) for _ in range(n)]
        if vtype not in _SCALAR:
            raise WeightsError(f"corrupt GGUF file {self.path}: unknown metadata type {vtype}")
        return self.take(_SCALAR[vtype])


def _shown(name: str) -> str:
    """A name as it is, or quoted when it holds line breaks or other unprintable characters."""
    return name if name.isprintable() and len(name) <= 200 else repr(name[:200])


def type_name(type_id: int) -> str | None:
    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return None


class GGUFFile:
    """The parsed header of a GGUF file; tensor bytes on demand."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(min(size, 1 << 16))
                if len(head) < 24:
                    raise WeightsError(f"truncated GGUF file {self.path}: {size} bytes")
                if head[:4] != b"GGUF":
                    raise WeightsError(f"{self.path} is not a GGUF file (bad magic {head[:4]!r})")
                buf = np.memmap(f, dtype=np.uint8, mode="r")
        except OSError as e:
            raise WeightsError(f"cannot read {self.path}: {e.strerror or e}") from None
        try:
            self._parse(memoryview(buf), size)
        finally:
            del buf

    def _parse(self, buf, size: int) -> None:
        path = self.path
        r = _Reader(buf, path)
        r.pos = 4
        self.version = r.take("<I")
        if self.version not in (2, 3):
            raise WeightsError(f"{path}: GGUF version {self.version} is not supported (need 2 or 3)")
        n_tensors, n_kv = r.take("<Q"), r.take("<Q")
        if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
            raise WeightsError(f"corrupt GGUF file {path}: {n_tensors} tensors, {n_kv} metadata entries")
        self.metadata: dict = {}
        for _ in range(n_kv):
            key = r.string()
            if key in self.metadata:
                raise WeightsError(f"corrupt GGUF file {path}: duplicate metadata key {_shown(key)}")
            self.metadata[key] = r.value(r.take("<I"))
        alignment = self.metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            shown = repr(alignment.tolist() if isinstance(alignment, np.ndarray) else alignment)
            raise WeightsError(f"corrupt GGUF file {path}: general.alignment must be a power of two, got "
                               f"{shown if len(shown) <= 40 else shown[:37] + '...'}")
        table, names = [], set()
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.take("<I")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise WeightsError(f"corrupt GGUF file {path}: tensor {_shown(name)} has {n_dims} dimensions")
            dims = [r.take("<Q") for _ in range(n_dims)]
            type_id, offset = r.take("<I"), r.take("<Q")
            if name in names:
                raise WeightsError(f"corrupt GGUF file {path}: duplicate tensor name {_shown(name)}")
            names.add(name)
            table.append((name, dims, type_id, offset))
        data_start = -(-r.pos // alignment) * alignment
        self.tensors: list[GGUFTensorInfo] = []
        for name, dims, type_id, offset in table:
            ttype = type_name(type_id)
            if ttype is None:
                raise WeightsError(f"{path}: tensor {_shown(name)} has unknown GGML type {type_id}")
            count = math.prod(dims)
            if any(d == 0 for d in dims) or count > _MAX_ELEMENTS:
                raise WeightsError(f"corrupt GGUF file {path}: tensor {_shown(name)} has absurd shape "
                                   f"{list(reversed(dims))}")
            per, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
            if dims[0] % per:
                raise WeightsError(f"corrupt GGUF file {path}: tensor {_shown(name)} of type {ttype} has rows of "
                                   f"{dims[0]} values, not a multiple of its block of {per}")
            nbytes = count // per * block_bytes
            start = data_start + offset
            if offset % alignment or start + nbytes > size:
                where = "past the end of the file" if start + nbytes > size else "at a misaligned offset"
                raise WeightsError(f"truncated GGUF file {path}: tensor {_shown(name)} points {where} "
                                   f"(bytes {start}..{start + nbytes}, file has {size})")
            self.tensors.append(GGUFTensorInfo(name, ttype, tuple(reversed(dims)), start, nbytes))
        _check_disjoint(self.tensors, path)

    def data(self, t: GGUFTensorInfo) -> np.ndarray:
        """The raw bytes of one tensor, shape (rows, bytes per row), mapped read-only from the file."""
        rows = math.prod(t.shape[:-1])
        try:
            return np.memmap(self.path, dtype=np.uint8, mode="r", offset=t.offset, shape=(rows, t.nbytes // rows))
        except (OSError, ValueError) as e:
            raise WeightsError(f"cannot read tensor {t.name} from {self.path}: {e}") from None


def _check_disjoint(tensors: list[GGUFTensorInfo], path: Path) -> None:
    """Tensors whose bytes overlap are a corrupt (or hostile) table: llama.cpp lays them out one after another."""
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors)
    for (_, end, a), (start, _, b) in itertools.pairwise(spans):
        if start < end:
            raise WeightsError(f"corrupt GGUF file {path}: tensors {_shown(a)} and {_shown(b)} overlap")


def read_gguf_header(path: Path) -> list[GGUFTensorInfo]:
    return GGUFFile(path).tensors
