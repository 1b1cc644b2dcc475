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

from .errors import ConfigError, UnsupportedModelError, WeightsError
from .resolve import resolve_model
from .models.llama import SUPPORTED_MODEL_TYPES, Model, ModelArgs

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


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


def compute_dtype(weights: dict[str, mx.array], dtype: str | None) -> mx.Dtype:
    """float32 on CPU (the CPU backend is 8x slower in bf16, 37x in fp16); else the checkpoint's half type."""
    if dtype is not None:
        if dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
        return DTYPES[dtype]
    if mx.default_device() == mx.cpu:
        return mx.float32
    for w in weights.values():
        if w.dtype in (mx.bfloat16, mx.float16):
            return w.dtype
    return mx.float32


def dense_fits(model: nn.Module, budget_fraction: float = 0.25) -> bool:
    """Whether float32 copies of the quantized layers fit in a quarter of RAM."""
    params = sum(
        m.weight.shape[0] * m.weight.shape[1] * 32 // m.bits
        for _, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    )
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return False
    return params * 4 <= budget_fraction * total


def dequantize_layers(model: nn.Module, dtype: mx.Dtype) -> None:
    """Replaces quantized layers by dense ones holding exactly the dequantized values.

    On the CPU backend the quantized matmul is single-threaded while float32 matmul goes to BLAS:
    the same math, several times faster. Used only on CPU and only when it fits in memory.
    """
    replacements = []
    for path, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            w = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits).astype(dtype)
            dense = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
            dense.weight = w
            if "bias" in m:
                dense.bias = m.bias
            replacements.append((path, dense))
        elif isinstance(m, nn.QuantizedEmbedding):
            w = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits).astype(dtype)
            dense = nn.Embedding(w.shape[0], w.shape[1])
            dense.weight = w
            replacements.append((path, dense))
    if replacements:
        model.update_modules(_unflatten(replacements))


def _unflatten(pairs):
    from mlx.utils import tree_unflatten

    return tree_unflatten(pairs)


def load_model(
    path: str | os.PathLike | None = None,
    dtype: str | None = None,
    dense: bool | None = None,
    lazy: bool = False,
    fuse: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Builds the model from a folder. dense=None: run quantized layers dense on CPU when they fit.
    fuse=True stacks q/k/v and gate/up (Model.fuse_projections) before anything is evaluated, so the
    stacked weights are built straight from the file with no second copy."""
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

    target = compute_dtype(weights, dtype)
    model.set_dtype(target)
    if dense is None:
        dense = mx.default_device() == mx.cpu and target == mx.float32 and dense_fits(model)
    if dense:
        dequantize_layers(model, target)
    if fuse and hasattr(model, "fuse_projections"):
        model.fuse_projections()
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
    fuse: bool = True,
    parallel: str | None = None,
):
    """Loads (model, tokenizer) from a model folder, a Hugging Face repo id, or the default model.

    parallel="tensor" or "pipeline": under mlx.launch with several ranks, the model is split across
    them (see distributed.py) and each rank evaluates only its own slice; in a single process the
    model loads as usual. None: every rank holds the whole model (data-parallel training).

    fuse=True stacks each block's q/k/v and gate/up projections into one matmul each (inference
    speed; LoRA training un-stacks them itself)."""
    from . import distributed

    group = distributed.world() if parallel is not None else None
    if group is not None:
        if adapter_path is not None:
            raise UnsupportedModelError("--adapter-path with several ranks: fuse the adapters first (mlxllama fuse)")
        model, config = load_model(path, dtype=dtype, dense=dense, lazy=True, fuse=False)
        distributed.shard(model, group, parallel)
        mx.eval(model.parameters())
        return model, _tokenizer_for(model, config)
    # with adapters, stack after they are attached (the groups without them), not before and again
    model, config = load_model(path, dtype=dtype, dense=dense, lazy=lazy, fuse=fuse and adapter_path is None)
    if adapter_path is not None:
        from .lora.adapters import load_adapters

        load_adapters(model, adapter_path)
        model.eval()  # the new LoRA layers' dropout: inference here, training is lora.run's business
        if fuse and hasattr(model, "fuse_projections") and model.fuse_projections() and not lazy:
            mx.eval(model.parameters())  # here, not lazily on whichever thread runs the model first
    return model, _tokenizer_for(model, config)


def _tokenizer_for(model, config: dict[str, Any]):
    from .tokenizer import load_tokenizer

    eos = config.get("eos_token_id")
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    return load_tokenizer(model.model_dir, eos_token_ids=eos_ids)
