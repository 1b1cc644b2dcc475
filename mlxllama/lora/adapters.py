"""Adapter folders in mlx-lm's layout: `adapters.safetensors` + `adapter_config.json`.

adapters.safetensors holds `<module path>.lora_a` (in, r) and `.lora_b` (r, out) for every wrapped
module, e.g. `model.layers.29.self_attn.q_proj.lora_a`. adapter_config.json holds
`fine_tune_type: "lora"`, `num_layers` and `lora_parameters: {rank, scale, dropout, keys}` (mlx-lm
reads these; the training options we add beside them are ignored there).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..errors import ConfigError, MlxllamaError, ModelNotFoundError, UnsupportedModelError, WeightsError
from .layers import apply_lora, linear_dims, lora_modules

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"


def lora_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """rank / scale / dropout / keys from an adapter config (mlx-lm's, old or new, or ours)."""
    params = dict(config.get("lora_parameters") or {})
    if "scale" not in params and "alpha" in params:  # some exporters write alpha; mlx-lm means scale
        raise ConfigError("adapter_config.json gives lora_parameters.alpha, not scale; mlx-lm's LoRA uses 'scale'")
    return {
        "rank": int(params.get("rank", 8)),
        "scale": float(params.get("scale", 20.0)),
        "dropout": float(params.get("dropout", 0.0)),
        "keys": params.get("keys"),
    }


def adapter_num_layers(config: dict[str, Any], model: nn.Module) -> int:
    n = config.get("num_layers", config.get("lora_layers", 16))
    n = int(n)
    if n <= 0:  # mlx-lm: layers[-0:] and layers[-(-1):]... both mean every layer
        return len(model.layers)
    if n > len(model.layers):
        raise WeightsError(f"the adapters were trained on the last {n} layers, but this base model has only "
                           f"{len(model.layers)} layers: they belong to a different base model")
    return n


def read_adapter_config(adapter_path: str | os.PathLike) -> dict[str, Any]:
    path = Path(adapter_path)
    if not path.is_dir():
        raise ModelNotFoundError(f"adapter folder not found: {path}")
    cfg = path / CONFIG_FILE
    if not cfg.is_file():
        raise ConfigError(f"{CONFIG_FILE} not found in {path} (is it an adapter folder?)")
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{cfg} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{cfg} must hold a JSON object")
    kind = config.get("fine_tune_type", "lora")
    if kind != "lora":
        raise UnsupportedModelError(f"{cfg}: fine_tune_type {kind!r} is not supported (only 'lora')")
    return config


def check_adapter_weights(model: nn.Module, weights: dict[str, mx.array], where: str) -> None:
    """Every wrapped module has lora_a/lora_b of the right shapes, and nothing else is in the file."""
    modules = lora_modules(model)
    for key, w in weights.items():
        path, _, leaf = key.rpartition(".")
        if leaf not in ("lora_a", "lora_b"):
            raise WeightsError(f"{where}: {key!r} is not a LoRA weight (expected names ending in .lora_a / .lora_b)")
        m = modules.get(path)
        if m is None:
            raise WeightsError(f"{where}: the adapters have weights for module {path!r}, which the base model "
                               "does not have or the adapter config does not wrap")
        in_dims, out_dims = linear_dims(m.linear)
        expected = (in_dims, m.rank) if leaf == "lora_a" else (m.rank, out_dims)
        if len(w.shape) != 2 or (leaf == "lora_a" and w.shape[0] != in_dims) or (leaf == "lora_b" and w.shape[1] != out_dims):
            raise WeightsError(f"{where}: module {path!r} of the base model is {in_dims} -> {out_dims}, but "
                               f"{key} has shape {tuple(w.shape)}: the adapters belong to a different base model")
        if tuple(w.shape) != expected:
            raise WeightsError(f"{where}: {key} has shape {tuple(w.shape)}, the adapter config implies {expected} "
                               f"(rank {m.rank})")
    for path in modules:
        for leaf in ("lora_a", "lora_b"):
            if f"{path}.{leaf}" not in weights:
                raise WeightsError(f"{where}: no {leaf} for module {path!r}")


def load_adapters(model: nn.Module, adapter_path: str | os.PathLike) -> nn.Module:
    """Wraps the model as the adapter config says and loads the adapter weights (checked)."""
    path = Path(adapter_path)
    config = read_adapter_config(path)
    file = path / ADAPTER_FILE
    if not file.is_file():
        raise WeightsError(f"{ADAPTER_FILE} not found in {path}")
    try:
        weights = mx.load(str(file))
    except Exception as e:
        raise WeightsError(f"cannot read {file}: {str(e).splitlines()[0] if str(e) else 'corrupt file'}") from None
    params = lora_parameters(config)
    num_layers = adapter_num_layers(config, model)
    try:
        apply_lora(model, num_layers=num_layers, **params)
    except MlxllamaError as e:
        raise WeightsError(f"{path}: the adapters do not fit this base model: {e}") from None
    check_adapter_weights(model, weights, str(file))
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    return model


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    out = {}
    for path, m in lora_modules(model).items():
        out[f"{path}.lora_a"] = m.lora_a
        out[f"{path}.lora_b"] = m.lora_b
    return out


def save_safetensors_atomic(file: Path, arrays: dict[str, mx.array], metadata: dict[str, str] | None = None) -> None:
    """Writes `file` through a temporary name beside it, so a crash never leaves half a file."""
    file = Path(file)
    tmp = file.with_name(f".{file.stem}.tmp.safetensors")
    mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})
    os.replace(tmp, file)


def write_json_atomic(file: Path, obj: Any) -> None:
    file = Path(file)
    tmp = file.with_name(f".{file.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=4) + "\n", encoding="utf-8")
    os.replace(tmp, file)


def adapter_config(num_layers: int, rank: int, scale: float, dropout: float, keys, **extra) -> dict[str, Any]:
    """The adapter_config.json dict: mlx-lm's fields first, then whatever else the caller records."""
    return {
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": dropout, "keys": keys},
        **extra,
    }


def save_adapters(model: nn.Module, adapter_path: str | os.PathLike, config: dict[str, Any]) -> Path:
    """Writes adapters.safetensors (the model's LoRA weights) and adapter_config.json."""
    path = Path(adapter_path)
    path.mkdir(parents=True, exist_ok=True)
    weights = adapter_weights(model)
    if not weights:
        raise WeightsError("the model has no LoRA layers to save")
    save_safetensors_atomic(path / ADAPTER_FILE, weights, {"format": "mlx"})
    write_json_atomic(path / CONFIG_FILE, config)
    return path


__all__ = [
    "ADAPTER_FILE", "CONFIG_FILE", "adapter_config", "adapter_weights", "check_adapter_weights",
    "load_adapters", "read_adapter_config", "save_adapters",
]
