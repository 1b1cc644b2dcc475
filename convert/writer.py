"""Output side of a conversion: an atomic output folder and a sharded safetensors writer.

Everything is written into a hidden temporary folder beside OUT and renamed into place at the end,
so OUT is either the complete new model or untouched; on any exception the temporary folder goes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import mlx.core as mx

from mlxllama.errors import ConversionError, InputError, WeightsError

from .safetensors_header import read_header

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def parse_size(size: int | str) -> int:
    """'5GB' -> 5_000_000_000, '500MB', '2GiB', or a plain int of bytes."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
        if not m or m.group(2).upper() not in _UNITS:
            raise InputError(f"max_shard_size {size!r} is not a size like '5GB', '500MB' or a number of bytes")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise InputError(f"max_shard_size must be positive, got {size!r}")
    return value


def _save_safetensors(path: str, arrays: dict, metadata: dict) -> None:
    """The one place bytes of weights are written (tests patch it to simulate a full disk)."""
    mx.save_safetensors(path, arrays, metadata=metadata)


def os_error(e: OSError, path: Path | str) -> ConversionError:
    if e.errno in _DISK_FULL:
        return ConversionError(f"disk full writing {path}")
    return ConversionError(f"could not write {path}: {e.strerror or e}")


@contextlib.contextmanager
def atomic_output_dir(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it becomes `out` (replacing it if force)."""
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not force:
        raise ConversionError(f"output {out} already exists; pass force=True (--force) to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the model folder should not be
    except OSError as e:
        raise os_error(e, out.parent) from None
    try:
        yield tmp
        _replace(tmp, out, force)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise os_error(e, getattr(e, "filename", None) or out) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(tmp: Path, out: Path, force: bool) -> None:
    if not (out.exists() or out.is_symlink()):
        os.rename(tmp, out)
        return
    if not force:  # appeared while we were converting
        raise ConversionError(f"output {out} already exists; pass force=True (--force) to replace it")
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rmdir(old)
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


class ShardWriter:
    """Accumulate evaluated tensors; write a shard whenever the next group would overflow max_bytes.

    Shards are written as `part-XXXXX.safetensors` and renamed to mlx-lm's names in `finish()`, once
    the shard count is known: `model.safetensors` alone, or `model-0000i-of-0000N.safetensors`.
    """

    def __init__(self, folder: Path, max_bytes: int, metadata: dict[str, str]):
        self.folder, self.max_bytes, self.metadata = Path(folder), max_bytes, metadata
        self.current: dict[str, mx.array] = {}
        self.current_bytes = 0
        self.parts: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, arrays: dict[str, mx.array]) -> None:
        """Add the tensors of one module together (a quantized weight with its scales and biases)."""
        nbytes = sum(a.nbytes for a in arrays.values())
        if self.current and self.current_bytes + nbytes > self.max_bytes:
            self.flush()
        self.current.update(arrays)
        self.current_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        if not self.current:
            return
        path = self.folder / f"part-{len(self.parts) + 1:05d}.safetensors"
        _save_safetensors(str(path), self.current, self.metadata)
        try:  # a full disk can leave a short file without an error from the writer
            read_header(path)
        except WeightsError:
            raise ConversionError(f"disk full writing {path} (file is short)") from None
        self.parts.append((path, sorted(self.current)))
        self.current, self.current_bytes = {}, 0
        mx.clear_cache()

    def finish(self, total_parameters: int | None = None) -> list[str]:
        """Write the last shard, give the shards their final names, write the index. Returns file names."""
        self.flush()
        n = len(self.parts)
        names = ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        weight_map = {}
        for (path, keys), name in zip(self.parts, names):
            os.rename(path, self.folder / name)
            weight_map.update({k: name for k in keys})
        metadata = {"total_size": self.total_bytes}
        if total_parameters is not None:
            metadata["total_parameters"] = total_parameters
        index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
        write_json(self.folder / "model.safetensors.index.json", index)
        return names


def write_json(path: Path, obj: dict, sort_keys: bool = False) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=4, sort_keys=sort_keys, ensure_ascii=False)
        f.write("\n")


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
