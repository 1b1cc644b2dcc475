"""Hugging Face repo ids: recognising them and fetching a model repository into the hub's cache."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import ModelNotFoundError

# the files of a model repository that the runtime and the converter read
MODEL_FILE_PATTERNS = [
    "config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt",
    "adapter_config.json", "adapters.safetensors", "pytorch_model.bin.index.json",
]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text)) and not text.startswith((".", "/", "~"))


def download_repo(repo_id: str) -> Path:
    """Fetches a model repo with huggingface_hub (its own cache); one line when that fails."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=MODEL_FILE_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelNotFoundError(
            f"could not fetch model {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: {reason[:160]}); "
            "pass a local model folder instead"
        ) from None
