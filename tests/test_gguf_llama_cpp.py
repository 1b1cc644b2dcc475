"""The real default model quantized by llama.cpp (Q4_0, Q4_K_M, Q5_K_M): each converts, and its next
tokens agree with llama.cpp's on the same file; the K-quants at least as well as Q4_0 does.
Skipped without llama-cpp-python (it is llama.cpp's quantizer and the reference runtime)."""

from __future__ import annotations

import ctypes

import pytest

from mlxllama.convert import convert, export_gguf
from test_gguf_export import TEXTS, llama_cpp_next_tokens, ours_next_tokens, require_llama_cpp

FTYPES = {"Q4_0": 2, "Q4_K_M": 15, "Q5_K_M": 17}


@pytest.fixture(scope="module")
def f16_gguf(default_model_dir, tmp_path_factory):
    require_llama_cpp()
    work = tmp_path_factory.mktemp("llama-cpp")
    convert(default_model_dir, work / "float", dequantize=True, dtype="float16", progress=False)
    export_gguf(work / "float", work / "f16.gguf")
    return work / "f16.gguf"


def _agreement(f16, name, tmp_path) -> tuple[int, int]:
    import llama_cpp

    from mlxllama import load

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = FTYPES[name], 2
    path = tmp_path / f"{name}.gguf"
    assert llama_cpp.llama_model_quantize(str(f16).encode(), str(path).encode(), ctypes.byref(params)) == 0
    convert(path, tmp_path / name, progress=False)
    _, tok = load(str(tmp_path / name))
    agree = total = 0
    for text in TEXTS:
        tokens = tok.encode(text)
        a, b = ours_next_tokens(tmp_path / name, tokens), llama_cpp_next_tokens(path, tokens)
        agree, total = agree + int((a == b).sum()), total + len(tokens)
    return agree, total


@pytest.mark.slow
def test_k_quants_agree_with_llama_cpp(f16_gguf, tmp_path):
    base, total = _agreement(f16_gguf, "Q4_0", tmp_path)
    assert base >= total - 4, f"Q4_0: {base} of {total}"
    for name in ("Q4_K_M", "Q5_K_M"):
        agree, _ = _agreement(f16_gguf, name, tmp_path)
        assert agree >= base, f"{name}: {agree} of {total} next tokens agree (Q4_0: {base})"
