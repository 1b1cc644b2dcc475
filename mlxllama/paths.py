"""Names and folders shared by the runtime and the converter: the user cache and the default model."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct-Q4_1"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_home() -> Path:
    """The user cache: $MLXLLAMA_HOME, else ~/.cache/mlxllama."""
    return Path(os.environ.get("MLXLLAMA_HOME") or Path.home() / ".cache" / "mlxllama").expanduser()


def default_model_dir(home: str | os.PathLike | None = None) -> Path:
    """Where the converted default model lives (whether or not it has been built yet)."""
    return Path(home or cache_home()).expanduser() / "models" / DEFAULT_MODEL_NAME


def downloads_dir(home: str | os.PathLike | None = None) -> Path:
    return Path(home or cache_home()).expanduser() / "downloads"
