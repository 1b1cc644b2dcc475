"""A checkpoint folder as a Source: Hugging Face safetensors, or an MLX folder (float or quantized).

Only headers are read up front (names, shapes, truncation). Tensors are fetched lazily with
`mx.load`, shard by shard, and dropped as soon as they are written, so peak memory stays near one
output shard plus the tensor being converted.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from mlxllama.errors import ConfigError, UnsupportedModelError, WeightsError

from .architecture import DROPPED, check_config, check_tensors, expected_shapes
from .quantize import packed_spec
from .safetensors_header import TensorInfo, read_header
from .source import AUX_FILES, Source, Tensor, dtype_from_config

_QUANT_KEYS = ("quantization", "quantization_config")


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json in {folder}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return config


def weight_files(folder: Path) -> list[Path]:
    """The safetensors shards, from the index when there is one; typed errors for what is missing."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise WeightsError(f"cannot read the weight_map of {index}") from None
        names = sorted(set(weight_map.values()))
        for name in names:
            if not (folder / name).is_file():
                raise WeightsError(f"shard {name} named in {index} is missing")
        return [folder / n for n in names]
    files = sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("*.safetensors"))
    if files:
        return files
    if any(folder.glob(p) for p in ("pytorch_model*.bin", "*.bin", "*.pt", "*.pth")):
        raise UnsupportedModelError(
            f"{folder} has only PyTorch weights; no torch here; convert to safetensors first")
    raise WeightsError(f"no *.safetensors weights in {folder}")


class _LazyShards:
    """key -> mx.array, loading each file lazily and dropping it once all its keys were taken."""

    def __init__(self, file_of: dict[str, Path]):
        self.file_of = dict(file_of)
        self.pending: dict[Path, int] = {}
        for f in self.file_of.values():
            self.pending[f] = self.pending.get(f, 0) + 1
        self.loaded: dict[Path, dict[str, mx.array]] = {}

    def take(self, key: str) -> mx.array:
        f = self.file_of.pop(key)
        if f not in self.loaded:
            try:
                self.loaded[f] = mx.load(str(f))
            except (RuntimeError, ValueError, OSError) as e:
                raise WeightsError(f"cannot load {f}: {e}") from None
        array = self.loaded[f].pop(key)
        self.pending[f] -= 1
        if not self.pending[f]:
            del self.loaded[f]
        return array


def open_folder(folder: Path) -> Source:
    folder = Path(folder)
    raw = read_config(folder)
    config = check_config(raw, str(folder / "config.json"))
    files = weight_files(folder)
    infos: dict[str, TensorInfo] = {}
    file_of: dict[str, Path] = {}
    order: list[str] = []
    for f in files:
        for name, info in read_header(f).items():
            if name in infos:
                raise WeightsError(f"tensor {name} appears in both {file_of[name].name} and {f.name}")
            infos[name], file_of[name] = info, f
            order.append(name)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        for name, shard in json.loads(index.read_text(encoding="utf-8"))["weight_map"].items():
            if file_of.get(name, Path()).name != shard:
                raise WeightsError(f"{index} places {name} in {shard}, which does not hold it")

    tied = config.get("tie_word_embeddings")
    if tied is None:  # undeclared: tied exactly when there is no lm_head
        tied = "lm_head.weight" not in infos
    config["tie_word_embeddings"] = bool(tied)
    expected = expected_shapes(config, tied=bool(tied))

    # logical shapes; packed weights are recognized by their .scales, as mlx-lm does
    found: dict[str, tuple[int, ...]] = {}
    packed = {}
    for name in order:
        if DROPPED.match(name) or (tied and name == "lm_head.weight"):
            continue
        base = name.rsplit(".", 1)[0]
        if name.endswith((".scales", ".biases")) and f"{base}.weight" in infos and f"{base}.scales" in infos:
            continue
        shape = infos[name].shape
        if name.endswith(".weight") and f"{base}.scales" in infos:
            if f"{base}.biases" not in infos:
                raise WeightsError(f"{folder}: {base}.scales has no {base}.biases (only affine quantization is supported)")
            if name not in expected:
                raise WeightsError(f"{folder}: unexpected tensor {name} for this config")
            in_dims = expected[name][-1]
            spec = packed_spec(shape, infos[f"{base}.scales"].shape, in_dims)
            if spec is None or shape[0] != expected[name][0]:
                raise WeightsError(f"{folder}: packed tensor {name} of shape {list(shape)} does not fit {list(expected[name])}")
            packed[name] = spec
            shape = expected[name]
        found[name] = shape
    check_tensors(found, expected, str(folder))

    shards = _LazyShards({k: file_of[k] for k in infos if k in found or k.rsplit(".", 1)[0] + ".weight" in packed})

    def fetcher(name: str):
        if name in packed:
            base = name.rsplit(".", 1)[0]
            return lambda: [shards.take(name), shards.take(f"{base}.scales"), shards.take(f"{base}.biases")]
        return lambda: [shards.take(name)]

    tensors = [Tensor(n, found[n], fetcher(n), packed.get(n)) for n in order if n in found]
    for key in _QUANT_KEYS:
        config.pop(key, None)
    config.pop("_name_or_path", None)
    files_out: dict[str, Path] = {n: folder / n for n in AUX_FILES if (folder / n).is_file()}
    return Source("safetensors", folder, config, tensors, dtype_from_config(raw), files_out)
