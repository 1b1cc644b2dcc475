"""Convert Hugging Face safetensors checkpoints, GGUF files and MLX folders to MLX model folders.

    from mlxllama.convert import convert
    report = convert("path/or/owner-repo", "out_dir", bits=4, group_size=64)
    export_gguf("out_dir", "model.gguf")      # and back to one GGUF file for llama.cpp

The output is the layout mlx-lm writes (config.json with "quantization", model*.safetensors,
model.safetensors.index.json, tokenizer files, generation_config.json), so it loads in mlx-lm too.
"""

from mlxllama.paths import DEFAULT_MODEL_NAME

from .default_model import build_default_model, build_hf_checkpoint, fetch_default_gguf
from .gguf_export import export_gguf
from .pipeline import ConvertReport, convert
from .quantize import BITS, GROUP_SIZES, RECIPES, quantization_error

__all__ = ["convert", "export_gguf", "ConvertReport", "build_default_model", "build_hf_checkpoint",
           "fetch_default_gguf", "DEFAULT_MODEL_NAME", "quantization_error", "BITS", "GROUP_SIZES", "RECIPES"]
