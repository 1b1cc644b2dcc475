"""Merge adapters into the base weights and write a new model folder in the usual layout.

Each wrapped layer becomes W + scale * lora_b^T @ lora_a^T (W dequantized first for a quantized
base), quantized again with that layer's bits and group size unless `dequantize`. The folder is
written beside its destination under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ..errors import WeightsError
from .adapters import load_adapters
from .layers import fuse_lora

WEIGHT_FILES = ("model.safetensors.index.json",)


def checkpoint_dtype(model_dir: Path) -> str:
    """The floating dtype the checkpoint stores (scales of a quantized model count), e.g. "bfloat16"."""
    from ..loader import load_weights, weight_files

    weights = load_weights(weight_files(model_dir))
    for w in weights.values():
        if w.dtype in (mx.float16, mx.bfloat16, mx.float32):
            return {mx.float16: "float16", mx.bfloat16: "bfloat16", mx.float32: "float32"}[w.dtype]
    return "float32"


def fuse(model_path: str | os.PathLike | None, adapter_path: str | os.PathLike, output: str | os.PathLike,
         dequantize: bool = False, force: bool = False, max_shard_size: str | int = "5GB") -> Path:
    """Writes base + adapters to `output` as a model folder; returns its path."""
    from mlxllama.convert.writer import ShardWriter, atomic_output_dir, parse_size, write_json

    from ..resolve import resolve_model
    from ..loader import dequantize_layers, load_model, read_json

    model_dir = resolve_model(model_path)
    output = Path(output)
    if output.resolve() == model_dir.resolve():
        raise WeightsError(f"the output folder {output} is the base model's folder; choose another")
    if (output.exists() or output.is_symlink()) and not force:
        from ..errors import ConversionError

        raise ConversionError(f"output {output} already exists; pass --force to replace it")
    dtype = checkpoint_dtype(model_dir)
    model, _ = load_model(model_dir, dtype=dtype, dense=False)
    load_adapters(model, adapter_path)
    fuse_lora(model, dequantize=dequantize)
    config = read_json(model_dir / "config.json")
    if dequantize:
        dequantize_layers(model, getattr(mx, dtype))
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)

    with atomic_output_dir(output, force) as tmp:
        writer = ShardWriter(tmp, parse_size(max_shard_size), {"format": "mlx"})
        modules: dict[str, dict[str, mx.array]] = {}
        for name in sorted(weights):  # a quantized weight stays in one shard with its scales and biases
            modules.setdefault(name.rpartition(".")[0], {})[name] = weights[name]
        for arrays in modules.values():
            writer.add(arrays)
        writer.finish(sum(v.size for v in weights.values()))
        write_json(tmp / "config.json", config)
        for f in sorted(model_dir.iterdir()):  # tokenizer files, generation_config.json, chat template, ...
            if f.is_file() and f.name != "config.json" and not f.name.startswith(".") \
                    and not (f.name.startswith("model") and f.name.endswith(".safetensors")) \
                    and f.name not in WEIGHT_FILES:
                shutil.copy2(f, tmp / f.name)
    return output
