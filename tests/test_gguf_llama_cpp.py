"""The real default model quantized as llama.cpp quantizes it (Q4_0, Q4_K_M, Q5_K_M): each converts, and
its next tokens agree with llama.cpp's on the same file; the K-quants at least as well as Q4_0 does.
The files come from tests/gguf_quantize.py (llama.cpp's own block quantizer and llama-quantize's type
rules; byte-identical to llama-quantize's output for these types), llama.cpp runs through
mlxllama.bench.llamacpp; skipped when no llama.cpp binding runs here (pip install xllamacpp)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mlxllama.convert import convert, export_gguf
from mlxllama.convert.gguf_reader import GGUFFile
from test_gguf_export import agreement, require_llama_cpp

QUANTIZE = Path(__file__).parent / "gguf_quantize.py"
# llama-quantize's tensor types for SmolLM2 (width 576: K-quants fall back where rows are not 256-aligned)
EXPECTED_TYPES = {"Q4_0": {"Q4_0", "Q8_0"}, "Q4_K_M": {"Q4_K", "Q5_0", "Q6_K", "Q8_0"},
                  "Q5_K_M": {"Q5_K", "Q5_1", "Q6_K", "Q8_0"}}


@pytest.fixture(scope="module")
def f16_gguf(default_model_dir, tmp_path_factory):
    require_llama_cpp()
    work = tmp_path_factory.mktemp("llama-cpp")
    convert(default_model_dir, work / "float", dequantize=True, dtype="float16", progress=False)
    export_gguf(work / "float", work / "f16.gguf")
    return work / "f16.gguf"


def _agreement(f16, name, tmp_path) -> tuple[int, int]:
    path = tmp_path / f"{name}.gguf"
    r = subprocess.run([sys.executable, str(QUANTIZE), str(f16), str(path), name], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert {t.type for t in GGUFFile(path).tensors if len(t.shape) == 2} == EXPECTED_TYPES[name]
    convert(path, tmp_path / name, progress=False)
    return agreement(tmp_path / name, path)


@pytest.mark.slow
def test_k_quants_agree_with_llama_cpp(f16_gguf, tmp_path):
    base, total = _agreement(f16_gguf, "Q4_0", tmp_path)
    assert base >= total - 4, f"Q4_0: {base} of {total}"
    for name in ("Q4_K_M", "Q5_K_M"):
        agree, _ = _agreement(f16_gguf, name, tmp_path)
        print(f"{name}: {agree} of {total} next tokens agree with llama.cpp (Q4_0: {base})")
        assert agree >= base, f"{name}: {agree} of {total} next tokens agree (Q4_0: {base})"
