"""A GGUF file (llama, mistral, qwen2) as a Source, read tensor by tensor from a memory map.

Per GGML type (see gguf_quants.py):
- Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K: repacked exactly into MLX affine group-32 weights
  (4, 5 or 8 bits) and kept as they are unless bits / group size / a recipe are asked for;
- Q6_K, Q3_K, Q2_K and the IQ types: dequantized with gguf-py's reference math, then re-quantized
  at REQUANT_BITS group 32 (or left float16 with keep_float);
- F32 / F16 / BF16: float; a float GGUF is quantized like a Hugging Face checkpoint, while a float
  matrix inside a quantized GGUF stays float (llama.cpp kept it so).
Names are mapped to Hugging Face ones and llama.cpp's Q/K row permutation is undone on the packed
weight, scales and biases alike (rows are output dimensions).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxllama.errors import UnsupportedModelError, WeightsError

from .architecture import check_config, check_tensors, expected_shapes
from .gguf_config import IGNORED, config_from_metadata, hf_module, rope_heads, unpermute
from .gguf_quants import EXACT_BITS, FLOAT, GROUP, REQUANT_BITS, can_dequantize, dequantize, repack
from .gguf_reader import GGUFFile, GGUFTensorInfo
from .quantize import QuantSpec
from .source import Source, Tensor

__all__ = ["open_gguf", "unpermute"]


def _check_types(gguf: GGUFFile) -> None:
    for t in gguf.tensors:
        if not can_dequantize(t.type):
            raise UnsupportedModelError(
                f"{gguf.path}: tensor {t.name} has GGML type {t.type}, which is not supported (supported: "
                f"{', '.join([*FLOAT, *EXACT_BITS, *REQUANT_BITS])})")


def open_gguf(path: Path, keep_float: bool = False) -> Source:
    """keep_float: leave the types that cannot be repacked exactly in float16 instead of re-quantizing them."""
    path = Path(path)
    gguf = GGUFFile(path)
    md = gguf.metadata
    names = {t.name for t in gguf.tensors}
    config = check_config(config_from_metadata(md, "output.weight" in names, path), str(path))
    _check_types(gguf)
    if config["num_hidden_layers"] * 9 > len(gguf.tensors):  # 9 tensors a block: never build a table of 10^9
        raise WeightsError(f"{path}: GGUF metadata claims {config['num_hidden_layers']} blocks, but the file has "
                           f"only {len(gguf.tensors)} tensors")
    if config["model_type"] == "llama" and config["head_dim"] % 2:
        raise WeightsError(f"{path}: head size {config['head_dim']} is odd (rotary embeddings need pairs)")
    expected = expected_shapes(config, tied="output.weight" not in names)
    quantized_file = any(t.type not in FLOAT for t in gguf.tensors)

    tensors: list[Tensor] = []
    found: dict[str, tuple[int, ...]] = {}
    for info in gguf.tensors:  # file order
        module, _, leaf = info.name.rpartition(".")
        if module in IGNORED:
            warnings.warn(f"{path}: dropping {info.name} (not representable in config.json)")
            continue
        hf = hf_module(module)
        if hf is None or leaf not in ("weight", "bias"):
            raise WeightsError(f"{path}: unexpected tensor {info.name} for a {config['model_type']} GGUF")
        name = f"{hf}.{leaf}"
        matrix = len(info.shape) == 2 and leaf == "weight"
        heads = rope_heads(module, config)
        packed = hint = None
        if matrix and info.type in EXACT_BITS:
            packed = QuantSpec(EXACT_BITS[info.type], GROUP)
        elif matrix and info.type in REQUANT_BITS:
            hint = False if keep_float else QuantSpec(REQUANT_BITS[info.type], GROUP)
        elif matrix and quantized_file:
            hint = False  # a float matrix among quantized ones: keep the file's choice
        found[name] = info.shape
        tensors.append(Tensor(name, info.shape, _fetcher(gguf, info, packed is not None, heads), packed, hint))
    check_tensors(found, expected, str(path))
    floats = {t.type for t in gguf.tensors if len(t.shape) == 2}
    dtype = "bfloat16" if floats == {"BF16"} else "float16"
    return Source("gguf", path, config, tensors, dtype, gguf_metadata=md)


def _fetcher(gguf: GGUFFile, info: GGUFTensorInfo, packed: bool, heads: int | None):
    def fetch() -> list[mx.array]:
        raw = gguf.data(info)
        if info.type in ("F16", "BF16"):  # as they are, without a float32 copy
            a = mx.array(np.ascontiguousarray(raw).view(np.uint16).reshape(info.shape))
            del raw
            a = a.view(mx.float16 if info.type == "F16" else mx.bfloat16)
            return [unpermute(a, heads) if heads is not None else a]
        try:
            arrays = list(repack(raw, info.type, info.shape)) if packed else [dequantize(raw, info.type, info.shape)]
        except ValueError as e:
            raise WeightsError(f"{gguf.path}: cannot read tensor {info.name} ({info.type}): {e}") from None
        finally:
            del raw
        out = []
        while arrays:  # one numpy array alive beside its MLX copy at a time
            a = arrays.pop(0)
            out.append(mx.array(np.ascontiguousarray(unpermute(a, heads) if heads is not None else a)))
            del a
        return out

    return fetch
