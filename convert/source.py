"""What the converter reads: a Source is a validated config plus a list of lazily fetched tensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx

from .quantize import DTYPES, QuantSpec

# Files carried over from an input folder unchanged (tokenizer and generation settings).
AUX_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
             "chat_template.jinja", "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt",
             "generation_config.json")


@dataclass
class Tensor:
    """One output weight: a float tensor, or a packed quantized module weight with scales and biases."""

    name: str                      # output key, e.g. "model.layers.0.mlp.up_proj.weight"
    shape: tuple[int, ...]         # logical (unquantized) shape
    fetch: Callable[[], list[mx.array]]  # [w] or [w_packed, scales, biases]; loads on call
    packed: QuantSpec | None = None      # existing quantization of a packed weight
    hint: QuantSpec | bool | None = None  # when keeping the source's own: a QuantSpec, or False for float


@dataclass
class Source:
    kind: str                      # "safetensors" or "gguf"
    path: Path
    config: dict                   # validated config.json for the output, without quantization keys
    tensors: list[Tensor]
    default_dtype: str             # name in DTYPES
    files: dict[str, Path] = field(default_factory=dict)  # output name -> file to copy
    gguf_metadata: dict | None = None  # tokenizer and generation settings come from here for GGUF

    @property
    def is_packed(self) -> bool:
        return any(t.packed is not None for t in self.tensors)


def dtype_from_config(config: dict) -> str:
    for key in ("torch_dtype", "dtype"):
        if config.get(key) in DTYPES:
            return config[key]
    return "float16"
