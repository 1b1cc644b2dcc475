"""Where the input comes from: a local path, or a Hugging Face repo id fetched into its cache."""

from __future__ import annotations

from pathlib import Path

from mlxllama.errors import ModelNotFoundError, UnsupportedModelError
from mlxllama.hub import download_repo, is_repo_id

from .checkpoint import open_folder
from .gguf import open_gguf
from .source import Source

def resolve(src: str | Path) -> Path:
    """A local file or folder as it is; 'owner/name' that is not a local path is downloaded."""
    path = Path(src).expanduser()
    if path.exists():
        return path
    if not is_repo_id(str(src)):
        raise ModelNotFoundError(f"no such file or folder: {src}")
    return download_repo(str(src))


def open_source(path: Path, keep_float: bool = False) -> Source:
    if path.is_dir():
        return open_folder(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF" or path.suffix.lower() == ".gguf":
        return open_gguf(path, keep_float=keep_float)
    if path.suffix in (".bin", ".pt", ".pth"):
        raise UnsupportedModelError(f"{path} is a PyTorch file; no torch here; convert to safetensors first")
    raise UnsupportedModelError(f"{path} is neither a GGUF file nor a checkpoint folder with config.json")
