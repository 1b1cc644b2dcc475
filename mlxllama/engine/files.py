"""Prompt-cache files: KV states in mlx-lm's safetensors layout, with metadata that says what made them.

The layout is mlx-lm's `save_prompt_cache` (0.32): tensors "<layer>.<i>..." from each layer cache's
state (KVCache: keys, values, offset; QuantizedKVCache: keys and values as (packed, scales, biases),
offset, group size, bits), metadata "0.<key>" (the user metadata), "1.<layer>" (the cache class name: KVCache or
QuantizedKVCache) and "2.<n>..." (which entries are scalars). So a file written here loads with
`mlx_lm.models.cache.load_prompt_cache` and `mlx_lm.generate --prompt-cache-file`, and one written
by `mlx_lm.cache_prompt` loads here. mlx-lm's own metadata keys are written too ("model",
"tokenizer_config"); ours are prefixed "mlxllama_": version, model identity, tokenizer hash, the
token ids, the cache kind and a CRC-32 of the tensors.

Writes are atomic (a temporary file in the same folder, then os.replace): a crash or a full disk
leaves the old file or none, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import zlib
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import InputError
from .prefix_cache import FLOAT, kind_of

FORMAT_VERSION = "1"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json")


class CacheFileError(InputError):
    """A prompt-cache file that cannot be used: unreadable, truncated, corrupted, or made for another model."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mlxllama")
    except PackageNotFoundError:  # a source tree that is not installed
        return "unknown"


def model_identity(model) -> str:
    """A hash naming the model's weights: its config.json, each weight file's header and 16 slices
    of 64 KiB spread over each file (two models differing anywhere but by a few bytes differ)."""
    cached = model.__dict__.get("_mlxllama_identity")
    if cached:
        return cached
    h = hashlib.sha256()
    folder = getattr(model, "model_dir", None)
    if folder is None:
        h.update(repr(sorted((k, v.shape) for k, v in tree_flatten(model.parameters()))).encode())
    else:
        folder = Path(folder)
        for name in ["config.json", *sorted(p.name for p in folder.glob("model*.safetensors"))]:
            path = folder / name
            if not path.is_file():
                continue
            size = path.stat().st_size
            h.update(f"{name}:{size}".encode())
            with open(path, "rb") as f:
                if name == "config.json" or size <= 1 << 20:
                    h.update(f.read())
                    continue
                for i in range(16):
                    f.seek(size * i // 16)
                    h.update(f.read(1 << 16))
    digest = h.hexdigest()[:32]
    object.__setattr__(model, "_mlxllama_identity", digest)
    return digest


def tokenizer_hash(model, tokenizer) -> str:
    """A hash of the tokenizer files in the model folder, the chat template and the stop ids."""
    h = hashlib.sha256()
    folder = getattr(model, "model_dir", None)
    for name in TOKENIZER_FILES if folder else ():
        path = Path(folder) / name
        if path.is_file():
            h.update(name.encode() + path.read_bytes())
    h.update(repr((getattr(tokenizer, "chat_template", None), sorted(tokenizer.eos_token_ids), len(tokenizer))).encode())
    return h.hexdigest()[:32]


def _crc(arrays: dict[str, mx.array]) -> str:
    crc = 0
    for key in sorted(arrays):
        crc = zlib.crc32(memoryview(np.ascontiguousarray(np.array(arrays[key]))).cast("B"), crc)
    return f"{crc:08x}"


def _layout(states: list, kind: str) -> tuple[list, list[str]]:
    """Per-layer states as mlx-lm's cache classes hold them."""
    data, classes = [], []
    for k, v in states:
        if isinstance(k, tuple):
            bits, group = (int(x) for x in kind[1:].split("g"))
            data.append((list(k), list(v), k[0].shape[2], group, bits))
            classes.append("QuantizedKVCache")
        else:
            data.append((k, v, k.shape[2]))  # mlx-lm 0.32: (keys, values, offset)
            classes.append("KVCache")
    return data, classes


def save_prompt_cache(path: str | os.PathLike, states: list, kind: str = FLOAT, *, tokens=None, metadata=None,
                      model=None, tokenizer=None) -> Path:
    """Writes per-layer (k, v) states (mlx-lm's layout, see the module docstring) atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise InputError(f"a prompt-cache file must end in .safetensors: {path}")
    data, classes = _layout(states, kind)
    arrays, scalars = {}, [""]
    for key, x in tree_flatten(data):
        if isinstance(x, mx.array):
            arrays[key] = x
        else:
            scalars.append((key, "scalar"))
            arrays[key] = mx.array(x)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.setdefault("tokenizer_config", "{}")
    meta.update(mlxllama_version=_version(), mlxllama_format=FORMAT_VERSION, mlxllama_cache_kind=kind,
                mlxllama_crc32=_crc(arrays))
    if model is not None:
        meta.setdefault("model", str(getattr(model, "model_dir", "")))
        meta["mlxllama_model"] = model_identity(model)
    if model is not None and tokenizer is not None:
        meta["mlxllama_tokenizer"] = tokenizer_hash(model, tokenizer)
    if tokens is not None:
        meta["mlxllama_tokens"] = json.dumps([int(t) for t in tokens], separators=(",", ":"))
    flat_meta = dict(tree_flatten([meta, classes, scalars]))
    path.parent.mkdir(parents=True, exist_ok=True)
    # named after this process, so that what a killed writer leaves is known stale (engine.disk removes it)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.getpid()}-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        mx.save_safetensors(tmp, arrays, flat_meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_header(path: str | os.PathLike) -> dict[str, str]:
    """The user metadata of a prompt-cache file ("0.<key>" entries), reading only its header."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CacheFileError(f"{path} is not a safetensors file (truncated)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 << 20:
            raise CacheFileError(f"{path} is not a safetensors file")
        header = f.read(n)
    try:
        meta = json.loads(header).get("__metadata__", {})
    except ValueError:
        raise CacheFileError(f"{path} has a corrupted header") from None
    return {k[2:]: v for k, v in meta.items() if k.startswith("0.")}


def load_prompt_cache(path: str | os.PathLike) -> tuple[list, str, dict[str, str]]:
    """(per-layer (k, v) states, cache kind, user metadata); CacheFileError when the file cannot be used."""
    path = Path(path)
    if not path.is_file():
        raise CacheFileError(f"prompt-cache file not found: {path}")
    try:
        arrays, flat_meta = mx.load(str(path), return_metadata=True)
        meta, classes, scalars = tree_unflatten(list(flat_meta.items()))
    except Exception as e:
        raise CacheFileError(f"cannot read the prompt-cache file {path}: {str(e).splitlines()[0]}") from None
    if "mlxllama_crc32" in meta and _crc(arrays) != meta["mlxllama_crc32"]:
        raise CacheFileError(f"the prompt-cache file {path} is corrupted (checksum mismatch)")
    for pos, _ in scalars[1:]:
        arrays[pos] = arrays[pos].item()
    layers = tree_unflatten(list(arrays.items()))
    states, kinds = [], set()
    for cls, state in zip(classes, layers):
        if cls == "KVCache":  # (keys, values, offset); older mlx-lm: (keys, values)
            n = state[2] if len(state) > 2 else state[0].shape[2]
            states.append((state[0][..., :n, :], state[1][..., :n, :]))
            kinds.add(FLOAT)
        elif cls == "QuantizedKVCache":
            k, v, offset, group, bits = state
            states.append((tuple(a[..., :offset, :] for a in k), tuple(a[..., :offset, :] for a in v)))
            kinds.add(kind_of(bits, group))
        else:
            raise CacheFileError(f"{path} holds a {cls}, which cannot be reused here (only KVCache and "
                                 "QuantizedKVCache files)")
    if len(kinds) != 1 or len(states) != len(classes):
        raise CacheFileError(f"{path} mixes cache kinds or is incomplete")
    return states, kinds.pop(), meta


def check_fits(path, states: list, model, tokenizer, meta: dict[str, str]) -> None:
    """CacheFileError unless the file was made for this model (and tokenizer, when it says)."""
    mine = model_identity(model)
    if "mlxllama_model" in meta:
        if meta["mlxllama_model"] != mine:
            raise CacheFileError(f"{path} was made for another model ({meta.get('model') or 'unknown'})")
        if tokenizer is not None and meta.get("mlxllama_tokenizer") not in (None, tokenizer_hash(model, tokenizer)):
            raise CacheFileError(f"{path} was made with another tokenizer")
    else:  # an mlx-lm file: it names the model folder it was made with
        named = meta.get("model")
        here = getattr(model, "model_dir", None)
        if named and here and os.path.isdir(named) and Path(named).resolve() != Path(here).resolve():
            raise CacheFileError(f"{path} was made for another model ({named})")
    args = getattr(model, "args", None)
    k = states[0][0] if states else None
    first = (k[0] if isinstance(k, tuple) else k) if k is not None else None
    if len(states) != len(model.layers) or (args is not None and first is not None
                                            and first.shape[1] != args.num_key_value_heads):
        raise CacheFileError(f"{path} does not fit this model's layers")
    if not isinstance(k, tuple) and first is not None and args is not None and first.shape[3] != args.head_dim:
        raise CacheFileError(f"{path} does not fit this model's layers")
