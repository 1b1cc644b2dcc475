"""mlxllama: run, convert, question-answer with, fine-tune and serve Llama-family models on MLX."""

from . import _platform  # noqa: F401  (loads an optimized BLAS before mlx.core on Linux)
from .errors import MlxllamaError
from .generate import GenerationResponse, batch_generate, generate, generate_step, stream_generate
from .loader import load
from .sample import make_logits_processors, make_sampler

__version__ = "0.1.0"


def __getattr__(name):  # heavier parts load on first use
    if name == "answer":
        from .qa import answer

        return answer
    if name == "convert":
        from mlxllama.convert import convert

        return convert
    if name == "export_gguf":
        from mlxllama.convert import export_gguf

        return export_gguf
    raise AttributeError(f"module 'mlxllama' has no attribute {name!r}")


__all__ = [
    "GenerationResponse",
    "MlxllamaError",
    "answer",
    "batch_generate",
    "convert",
    "export_gguf",
    "generate",
    "generate_step",
    "load",
    "make_logits_processors",
    "make_sampler",
    "stream_generate",
]
