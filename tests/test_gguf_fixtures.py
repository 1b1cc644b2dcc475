"""llama.cpp's own quantizations of a tiny random llama (tests/data/gguf, made by make_fixtures.py):
each converts, and every weight matches gguf-py's dequantization of the same bytes (exactly for the
repacked types, within ERROR_BOUND for the re-quantized ones)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import quants
from gguf.constants import GGMLQuantizationType as T

from mlxllama.convert import convert
from mlxllama.convert.gguf_config import hf_module, unpermute
from mlxllama.convert.gguf_quants import EXACT_BITS, REQUANT_BITS
from mlxllama.convert.gguf_reader import GGUFFile
from test_gguf import ERROR_BOUND, load_dense, rel

FIXTURES = sorted((Path(__file__).parent / "data" / "gguf").glob("tiny-*.gguf"))


@pytest.mark.skipif(not FIXTURES, reason="no fixtures in tests/data/gguf (run make_fixtures.py)")
@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_llama_cpp_fixture(tmp_path, path):
    g = GGUFFile(path)
    heads = {"attn_q": int(g.metadata["llama.attention.head_count"]),
             "attn_k": int(g.metadata["llama.attention.head_count_kv"])}
    convert(path, tmp_path / "out", dtype="float32", progress=False)
    got = load_dense(tmp_path / "out")
    for t in g.tensors:
        module, _, leaf = t.name.rpartition(".")
        ref = quants.dequantize(np.array(g.data(t)), T[t.type]).reshape(t.shape).astype(np.float32)
        kind = module.rsplit(".", 1)[-1]
        if kind in heads:
            ref = unpermute(ref, heads[kind])
        mine = got[f"{hf_module(module)}.{leaf}"]
        if t.type in REQUANT_BITS:
            assert rel(mine, ref) < ERROR_BOUND[REQUANT_BITS[t.type]], (t.name, t.type)
        else:
            assert np.array_equal(mine, ref), (t.name, t.type)
