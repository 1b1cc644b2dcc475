"""tests/gguf_quantize.py, the llama-quantize stand-in the llama.cpp tests use: it rebuilds the committed
fixtures (made by llama.cpp's own llama_model_quantize) byte for byte, and picks llama-quantize's
tensor types for SmolLM2's shapes (rows of 576 values, not a multiple of 256)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from gguf_quantize import target_type

HERE = Path(__file__).parent
FIXTURES = ["Q4_K_M", "Q5_K_M", "Q6_K", "Q3_K_M", "Q2_K", "IQ4_NL", "IQ4_XS", "Q5_0", "Q5_1"]
REBUILD = """
import sys
sys.path.insert(0, sys.argv[1])
from gguf_tiny import float_weights, write_gguf
from gguf_quantize import quantize
out = sys.argv[2]
write_gguf(out + "/tiny-F16.gguf", {n: ("F16" if w.ndim == 2 else "F32", w) for n, w in float_weights(seed=7).items()})
for name in sys.argv[3:]:
    quantize(out + "/tiny-F16.gguf", f"{out}/tiny-{name}.gguf", name)
"""


def test_rebuilds_llama_cpp_fixtures(tmp_path):
    if importlib.util.find_spec("xllamacpp") is None:
        pytest.skip("needs llama.cpp's block quantizer (pip install xllamacpp)")
    r = subprocess.run([sys.executable, "-c", REBUILD, str(HERE), str(tmp_path), *FIXTURES], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in FIXTURES:
        ours, theirs = (tmp_path / f"tiny-{name}.gguf").read_bytes(), (HERE / "data" / "gguf" / f"tiny-{name}.gguf").read_bytes()
        assert ours == theirs, name


def _smollm2_types(ftype: str) -> Counter:
    """Tensor types for SmolLM2-135M's 2-D tensors (GGUF shapes, ne0 first; tied embeddings)."""
    shapes = {"attn_q": (576, 576), "attn_k": (576, 192), "attn_v": (576, 192), "attn_output": (576, 576),
              "ffn_gate": (576, 1536), "ffn_up": (576, 1536), "ffn_down": (1536, 576)}
    counters = {"attn_v": 0, "ffn_down": 0, "n_attn_v": 30}
    got = Counter([target_type("token_embd.weight", (576, 49152), ftype, 30, 3, True, counters).name])
    for i in range(30):
        for kind, shape in sorted(shapes.items()):
            got[target_type(f"blk.{i}.{kind}.weight", shape, ftype, 30, 3, True, counters).name] += 1
    return got


def test_llama_quantize_mixture_for_576_wide_rows():
    # as llama-quantize (llama.cpp via llama-cpp-python 0.3.36) wrote them for the default model
    assert _smollm2_types("Q4_K_M") == {"Q5_0": 166, "Q4_K": 16, "Q8_0": 15, "Q6_K": 14}
    assert _smollm2_types("Q5_K_M") == {"Q5_1": 166, "Q5_K": 16, "Q8_0": 15, "Q6_K": 14}
    assert _smollm2_types("Q2_K") == {"Q4_0": 180, "Q3_K": 30, "Q8_0": 1}
    assert _smollm2_types("Q6_K") == {"Q8_0": 181, "Q6_K": 30}
    assert target_type("blk.0.attn_norm.weight", (576,), "Q4_K_M", 30, 3, True, {}) is None
