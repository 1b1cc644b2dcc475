"""Model folder -> (model, tokenizer). Quantization is replayed from config.json, weights load lazily."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from . import _platform  # noqa: F401  (optimized BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import cpu_weights, device
from .cpu_weights import dense_fits, dequantize_layers  # noqa: F401  (part of this module's API)
from .device import DTYPES, compute_dtype  # noqa: F401  (part of this module's API; device policy decides)
from .errors import ConfigError, UnsupportedModelError, WeightsError
from .resolve import resolve_model
from .models.llama import SUPPORTED_MODEL_TYPES, Model, ModelArgs


def read_json(path: Path, what: str = "") -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path.name} not found in {path.parent}{what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


def load_config(model_dir: Path) -> dict[str, Any]:
    config = read_json(model_dir / "config.json")
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        try:
            eos = json.loads(gen.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            eos = None
        if eos is not None:
            config["eos_token_id"] = eos
    return config


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        for shard in shards:
            if not (model_dir / shard).is_file():
                raise WeightsError(f"{index.name} names {shard}, which is missing from {model_dir}")
    files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.gguf")):
            raise WeightsError(f"no MLX weights (model*.safetensors) in {model_dir}; convert it first with `mlxllama convert`")
        raise WeightsError(f"no model*.safetensors files in {model_dir}")
    return files


def load_weights(files: list[Path]) -> dict[str, mx.array]:
    """Lazily maps every tensor of every shard (nothing is read until it is evaluated)."""
    weights: dict[str, mx.array] = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:
            raise WeightsError(f"cannot read {f.name}: {str(e).splitlines()[0] if str(e) else 'truncated or corrupt'}") from None
    return weights


def model_classes(config: dict[str, Any], config_path: Path):
    model_type = config.get("model_type")
    if not model_type:
        raise ConfigError(f"{config_path} is missing required key(s): model_type")
    if model_type in SUPPORTED_MODEL_TYPES:
        return Model, ModelArgs
    try:  # the fallback zoo for architectures outside the Llama family
        from mlx_lm.utils import _get_classes

        return _get_classes(config)
    except Exception:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)}, "
            "or any architecture mlx-lm knows)"
        ) from None


def quantize_from_config(model: nn.Module, config: dict[str, Any], weights: dict[str, mx.array]) -> None:
    """Turns the layers the checkpoint stores quantized into quantized layers (mlx-lm's rules)."""
    quant = config.get("quantization")
    if not quant:
        return

    def predicate(path: str, module: nn.Module):
        if path in quant:  # per-module override: dict or False
            return quant[path]
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        in_dims = module.weight.shape[-1]
        group_size = in_dims // weights[f"{path}.scales"].shape[-1]
        bits = weights[f"{path}.weight"].shape[-1] * 32 // in_dims
        return {"group_size": group_size, "bits": bits, "mode": "affine"}

    nn.quantize(
        model,
        group_size=quant.get("group_size", 64),
        bits=quant.get("bits", 4),
        mode=quant.get("mode", "affine"),
        class_predicate=predicate,
    )


def check_weights(model: nn.Module, weights: dict[str, mx.array], model_dir: Path) -> None:
    """Every parameter present with the right shape, nothing extra: names the first offending key."""
    expected = dict(tree_flatten(model.parameters()))
    for key, param in expected.items():
        if key not in weights:
            raise WeightsError(f"{model_dir}: weight {key!r} is missing from the checkpoint")
        if tuple(weights[key].shape) != tuple(param.shape):
            raise WeightsError(
                f"{model_dir}: weight {key!r} has shape {tuple(weights[key].shape)}, "
                f"config.json implies {tuple(param.shape)}"
            )
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise WeightsError(f"{model_dir}: unexpected weight {extra[0]!r} (and {len(extra) - 1} more) for this config")


def _stack_alias(stack: bool, fuse: bool | None) -> bool:
    if fuse is None:
        return stack
    import warnings

    warnings.warn("load(..., fuse=) is now stack= (fuse means merging LoRA adapters); fuse= goes in the next "
                  "release", DeprecationWarning, stacklevel=3)
    return fuse


def load_model(
    path: str | os.PathLike | None = None,
    dtype: str | None = None,
    dense: bool | None = None,
    lazy: bool = False,
    stack: bool = False,
    train: bool = False,
    fuse: bool | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Builds the model from a folder. dense: how quantized layers run on the CPU (device.weights_form:
    None decides, the native kernel when built; True: float32 copies; False: stay quantized); train=True
    prefers the dense copies (LoRA's backward pass). stack=True stacks q/k/v and gate/up
    (Model.stack_projections) before anything is evaluated, so the stacked weights are built straight
    from the file with no second copy. `fuse` is the old name of `stack` (deprecated)."""
    stack = _stack_alias(stack, fuse)
    model_dir = resolve_model(path)
    config = load_config(model_dir)
    model_class, args_class = model_classes(config, model_dir / "config.json")
    try:
        args = args_class.from_dict(config)
    except KeyError as e:
        raise ConfigError(f"{model_dir / 'config.json'} is missing required key(s): {e.args[0]}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{model_dir / 'config.json'}: {e}") from None
    try:
        model = model_class(args)
    except (ValueError, TypeError, KeyError, ZeroDivisionError) as e:
        what = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise ConfigError(f"{model_dir / 'config.json'}: {what}") from None

    weights = load_weights(weight_files(model_dir))
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    quantize_from_config(model, config, weights)
    check_weights(model, weights, model_dir)
    model.load_weights(list(weights.items()), strict=False)

    target = device.compute_dtype(weights, dtype)
    scale_dtype = cpu_weights.checkpoint_scale_dtype(weights)
    model.set_dtype(target)
    form = device.weights_form(model, dense, target, train=train)
    if form == "dense":
        cpu_weights.apply(model, form, target)
    if stack and hasattr(model, "stack_projections"):
        model.stack_projections()
    if form == "kernel":  # after fusing: the stacked layers are new modules
        cpu_weights.apply(model, form, target, scale_dtype)
    model.weights_form = form
    if not lazy:
        try:
            mx.eval(model.parameters())
        except Exception as e:
            raise WeightsError(f"cannot read the weights in {model_dir}: {str(e).splitlines()[0]}") from None
    model.eval()
    model.model_dir = str(model_dir)
    return model, config


def load(
    path: str | os.PathLike | None = None,
    adapter_path: str | os.PathLike | None = None,
    dtype: str | None = None,
    dense: bool | None = None,
    lazy: bool = False,
    stack: bool = True,
    parallel: str | None = None,
    train: bool = False,
    fuse: bool | None = None,
):
    """Loads (model, tokenizer) from a model folder, a Hugging Face repo id, or the default model.

    parallel="tensor" or "pipeline": under mlx.launch with several ranks, the model is split across
    them (see distributed.py) and each rank evaluates only its own slice; in a single process the
    model loads as usual. None: every rank holds the whole model (data-parallel training).

    stack=True stacks each block's q/k/v and gate/up projections into one matmul each (inference
    speed; LoRA training un-stacks them itself). `fuse` is the old name of `stack` (deprecated;
    "fuse" now means merging LoRA adapters, as in `mlxllama fuse`)."""
    stack = _stack_alias(stack, fuse)
    from . import distributed

    group = distributed.world() if parallel is not None else None
    if group is not None:
        if adapter_path is not None:
            raise UnsupportedModelError("--adapter-path with several ranks: fuse the adapters first (mlxllama fuse)")
        model, config = load_model(path, dtype=dtype, dense=dense, lazy=True, stack=False)
        distributed.shard(model, group, parallel)
        mx.eval(model.parameters())
        return model, _tokenizer_for(model, config)
    # with adapters, stack after they are attached (the groups without them), not before and again
    model, config = load_model(path, dtype=dtype, dense=dense, lazy=lazy, stack=stack and adapter_path is None,
                               train=train)
    if adapter_path is not None:
        from .lora.adapters import load_adapters

        load_adapters(model, adapter_path)
        model.eval()  # the new LoRA layers' dropout: inference here, training is lora.run's business
        if stack and hasattr(model, "stack_projections") and model.stack_projections():
            if model.weights_form == "kernel":
                cpu_weights.apply(model, "kernel", mx.float32)
            if not lazy:
                mx.eval(model.parameters())  # here, not lazily on whichever thread runs the model first
    return model, _tokenizer_for(model, config)


def _tokenizer_for(model, config: dict[str, Any]):
    from .tokenizer import load_tokenizer
    eos = config.get("eos_token_id")
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    return load_tokenizer(model.model_dir, eos_token_ids=eos_ids)
