"""Where models come from: a local folder, a Hugging Face repo id, or the embedded default model."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import ModelNotFoundError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct-Q4_1"
HF_PATTERNS = [
    "*.json",
    "model*.safetensors",
    "tokenizer.model",
    "*.jinja",
    "*.txt",
]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_home() -> Path:
    """The user cache: $MLXLLAMA_HOME, else ~/.cache/mlxllama."""
    return Path(os.environ.get("MLXLLAMA_HOME") or Path.home() / ".cache" / "mlxllama").expanduser()


def default_model_path() -> Path:
    """The default model's folder, built from its PyPI wheel on first use."""
    path = cache_home() / "models" / DEFAULT_MODEL_NAME
    if (path / "config.json").is_file():
        return path
    from mlxllama.convert.default_model import build_default_model  # lazy: only on first use

    return Path(build_default_model(cache_home(), progress=True))


def is_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text)) and not text.startswith((".", "/", "~"))


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


def download_repo(repo_id: str, patterns: list[str] | None = None) -> Path:
    """Fetches a model repo with huggingface_hub (its own cache); one line when that fails."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=patterns or HF_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelNotFoundError(
            f"could not fetch model {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: {reason[:160]}); "
            "pass a local model folder instead"
        ) from None
