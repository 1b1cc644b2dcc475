"""The prefix cache's disk tier: one prompt-cache file (engine.files) per entry in one folder.

Entries are keyed by model identity, tokenizer hash, cache kind and token ids (the file name is a
hash of all four; the header holds them). A lookup reads only file headers, picks the longest
common prefix among this model's entries and loads that one file; loading touches the file, and
when the folder passes `max_bytes` the least recently used files go first. An entry is written to a
temporary file named after the writing process and renamed when whole, so a writer killed mid-write
leaves only that temporary file: it is never listed or loaded, and the next eviction removes it
once its process is gone. A file that cannot be read, fails its checksum or does not fit the model
is never used: a warning, then it is removed (this folder is ours) and the caller runs cold. A
folder that cannot be written to only warns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Sequence

from .files import (
    CacheFileError,
    check_fits,
    load_prompt_cache,
    model_identity,
    read_header,
    save_prompt_cache,
)
from .prefix_cache import Hit, cut_states

log = logging.getLogger("mlxllama.cache")

DEFAULT_MAX_BYTES = 2 << 30


def default_folder() -> Path:
    """$MLXLLAMA_PROMPT_CACHE, else prompt-cache/ in the user cache ($MLXLLAMA_HOME or ~/.cache/mlxllama)."""
    from ..paths import cache_home

    return Path(os.environ.get("MLXLLAMA_PROMPT_CACHE") or cache_home() / "prompt-cache").expanduser()


def sessions_folder() -> Path:
    """Where `mlxllama chat --session NAME` keeps conversations: sessions/ beside the prompt cache."""
    return default_folder().parent / "sessions"


def _common(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = 0
    for x, y in zip(a[:limit], b):
        if x != y:
            break
        n += 1
    return n


def folder_entries(folder: str | os.PathLike) -> list[tuple[Path, int, float, dict]]:
    """(path, bytes, last used, header metadata) of every readable entry, most recently used first."""
    out = []
    folder = Path(folder)
    if not folder.is_dir():
        return out
    for path in folder.glob("*.safetensors"):
        if path.name.startswith("."):  # a file being written (or left by a writer that was killed)
            continue
        try:
            st = path.stat()
            meta = read_header(path)
        except (OSError, CacheFileError):
            meta, st = {}, path.stat() if path.exists() else None
        if st is not None:
            out.append((path, st.st_size, st.st_mtime, meta))
    return sorted(out, key=lambda e: -e[2])


class DiskCache:
    def __init__(self, model, tokenizer, folder: str | os.PathLike | None = None, max_bytes: int = DEFAULT_MAX_BYTES):
        self.model, self.tokenizer = model, tokenizer
        self.folder = Path(folder) if folder is not None else default_folder()
        self.max_bytes = max_bytes
        self.identity = model_identity(model)
        self._warned_write = False

    def _candidates(self, kinds: Sequence[str]) -> list[tuple[Path, list[int], str]]:
        out = []
        for path, _, _, meta in folder_entries(self.folder):
            if meta.get("mlxllama_model") != self.identity or meta.get("mlxllama_cache_kind") not in kinds:
                continue
            try:
                tokens = json.loads(meta.get("mlxllama_tokens", "[]"))
            except ValueError:
                continue
            out.append((path, tokens, meta["mlxllama_cache_kind"]))
        return out

    def _best(self, tokens: Sequence[int], kinds: Sequence[str], limit: int):
        best = (0, None, None)
        for path, cached, kind in self._candidates(kinds):
            n = _common(tokens, cached, limit)
            if n > best[0]:
                best = (n, path, kind)
        return best

    def probe(self, tokens: Sequence[int], kinds: Sequence[str], limit: int) -> int:
        return self._best(list(tokens), kinds, limit)[0]

    def lookup(self, tokens: Sequence[int], kinds: Sequence[str], limit: int) -> Hit | None:
        n, path, kind = self._best(list(tokens), kinds, limit)
        if path is None:
            return None
        try:
            states, file_kind, meta = load_prompt_cache(path)
            check_fits(path, states, self.model, self.tokenizer, meta)
        except CacheFileError as e:
            log.warning("ignoring a prompt-cache entry: %s", e)
            path.unlink(missing_ok=True)
            return None
        try:
            os.utime(path)
        except OSError:
            pass
        return Hit(n, cut_states(states, n), file_kind, "disk")

    def name_for(self, tokens: Sequence[int], kind: str) -> Path:
        key = hashlib.sha256(f"{self.identity}|{kind}|{','.join(map(str, tokens))}".encode()).hexdigest()[:32]
        return self.folder / f"{key}.safetensors"

    def save(self, tokens: Sequence[int], states: list, kind: str) -> Path | None:
        path = self.name_for(tokens, kind)
        if path.exists():
            try:
                os.utime(path)
            except OSError:
                pass
            return path
        covered = [p for p, cached, k in self._candidates([kind])
                   if k == kind and len(cached) < len(tokens) and list(tokens[: len(cached)]) == cached]
        try:
            save_prompt_cache(path, states, kind, tokens=tokens, model=self.model, tokenizer=self.tokenizer)
        except (OSError, RuntimeError) as e:  # unwritable or full folder: the cache is an optimisation
            if not self._warned_write:
                log.warning("cannot write the prompt cache in %s: %s", self.folder, getattr(e, "strerror", None) or e)
                self._warned_write = True
            return None
        for old in covered:  # the new entry holds all of theirs (a chat's earlier turns)
            old.unlink(missing_ok=True)
        self.evict()
        return path

    def evict(self) -> None:
        """Removes least recently used files until the folder holds at most max_bytes."""
        evict_folder(self.folder, self.max_bytes)


def _writer_gone(tmp: Path) -> bool:
    """Whether the process that was writing `tmp` (".tmp-<pid>-....safetensors") has ended."""
    pid = tmp.name.split("-")[1]
    if not pid.isdigit():  # an older name without the pid: stale after a day
        try:
            return time.time() - tmp.stat().st_mtime > 86400
        except OSError:
            return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):
        pass
    return False


def remove_debris(folder) -> list[Path]:
    """Removes the partial files of writers that were killed mid-write (never a live writer's)."""
    folder = Path(folder)
    gone = []
    for tmp in folder.glob(".tmp-*.safetensors") if folder.is_dir() else []:
        if _writer_gone(tmp):
            tmp.unlink(missing_ok=True)
            gone.append(tmp)
    return gone


def evict_folder(folder, max_bytes: int) -> list[Path]:
    remove_debris(folder)
    entries = folder_entries(folder)
    total = sum(size for _, size, _, _ in entries)
    removed = []
    for path, size, _, _ in reversed(entries):  # least recently used first
        if total <= max_bytes:
            break
        try:
            path.unlink()
            removed.append(path)
            total -= size
        except OSError:
            pass
    return removed


def disk_prefix_cache(model, tokenizer, max_bytes: int = DEFAULT_MAX_BYTES, folder=None, memory_bytes: int = 0):
    """A PrefixCache whose entries are also written to the disk tier (for `qa` and `chat`, whose
    later processes start from it). memory_bytes: what stays in memory as well (0: nothing, the
    session holds its own cache)."""
    from .prefix_cache import PrefixCache

    return PrefixCache(max_bytes=memory_bytes, disk=DiskCache(model, tokenizer, folder, max_bytes), persist=True)


def parse_bytes(text: str | int) -> int:
    """'2GB', '512M', '1.5g', '1000000' -> bytes (powers of 1024 for the suffixes)."""
    if isinstance(text, int):
        return text
    s = str(text).strip().lower().removesuffix("b").removesuffix("i")
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    scale = units.get(s[-1:], 1)
    try:
        value = float(s[:-1] if s[-1:] in units else s)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (examples: 2GB, 512MB, 1000000)") from None
    if value < 0:
        raise ValueError(f"a size must be >= 0, got {text!r}")
    return int(value * scale)
