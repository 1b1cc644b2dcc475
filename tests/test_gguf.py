"""GGUF import: every GGML type against gguf-py's dequantization of the same bytes, bad files, memory.

The types MLX holds exactly (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K) must match to float32
exactly (float16 scales: to float16 rounding); the others are re-quantized at REQUANT_BITS and must
stay within ERROR_BOUND (relative RMS, measured on random blocks, which are harsher than real weights).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import mlxllama._platform  # noqa: F401
import mlx.core as mx
import numpy as np
import pytest
from gguf import quants
from gguf.constants import GGMLQuantizationType as T

from gguf_blocks import F16_FIELDS, QUANTIZABLE, blocks
from gguf_tiny import HEADS, KV_HEADS, float_weights, write_gguf
from mlxllama.convert import convert
from mlxllama.convert.gguf_config import hf_module, unpermute
from mlxllama.convert.gguf_quants import EXACT_BITS, REQUANT_BITS, repack
from mlxllama.errors import UnsupportedModelError, WeightsError
from test_convert import _gguf_tensor_type_offset

ERROR_BOUND = {8: 0.01, 6: 0.03, 5: 0.06, 4: 0.08}
EXACT = sorted(EXACT_BITS)
REQUANT = sorted(REQUANT_BITS)


def load_dense(folder: Path) -> dict[str, np.ndarray]:
    """Every weight of an MLX folder as float32 numpy, quantized ones dequantized."""
    config = json.loads((folder / "config.json").read_text())
    q = config.get("quantization", {})
    w = {}
    for f in sorted(folder.glob("model*.safetensors")):
        w.update(mx.load(str(f)))
    out = {}
    for name, a in w.items():
        base = name.rsplit(".", 1)[0]
        if name.endswith((".scales", ".biases")) and f"{base}.weight" in w:
            continue
        if name.endswith(".weight") and f"{base}.scales" in w:
            spec = q.get(base) if isinstance(q.get(base), dict) else q
            a = mx.dequantize(a, w[f"{base}.scales"], w[f"{base}.biases"], group_size=spec["group_size"],
                              bits=spec["bits"])
        out[name] = np.array(a.astype(mx.float32))
    return out


def reference(raw: dict[str, tuple[str, np.ndarray]], arch: str = "llama") -> dict[str, np.ndarray]:
    """gguf-py's dequantization of each tensor, in Hugging Face names and row order."""
    out = {}
    for name, (ttype, a) in raw.items():
        module, _, leaf = name.rpartition(".")
        v = a.astype(np.float32) if ttype in ("F32", "F16") else quants.dequantize(a, T[ttype])
        if ttype == "F16":
            v = a.astype(np.float16).astype(np.float32)
        if arch == "llama" and module.endswith(("attn_q", "attn_k")):
            v = unpermute(v, HEADS if module.endswith("attn_q") else KV_HEADS)
        out[f"{hf_module(module)}.{leaf}"] = v
    return out


def tiny_file(path: Path, matrix_type: str, arch: str = "llama", seed: int = 0, **kw):
    """A tiny model whose matrices are all `matrix_type` (norms and biases F32)."""
    raw = {}
    for i, (name, w) in enumerate(float_weights(seed, arch, **kw).items()):
        if w.ndim == 2 and matrix_type not in ("F32", "F16"):
            raw[name] = (matrix_type, blocks(matrix_type, w.shape, seed + i))
        else:
            raw[name] = (matrix_type if w.ndim == 2 else "F32", w)
    write_gguf(path, raw, arch)
    return raw


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("ttype", EXACT)
def test_exact_types_repack_bit_for_bit(ttype):
    raw = blocks(ttype, (16, 512), seed=1)
    ref = quants.dequantize(raw, T[ttype])
    w, s, b = repack(raw, ttype, (16, 512))
    bits = EXACT_BITS[ttype]
    got = mx.dequantize(mx.array(w), mx.array(s), mx.array(b), group_size=32, bits=bits)
    assert np.array_equal(np.array(got), ref)  # float32 scales: exact
    half = mx.dequantize(mx.array(w), mx.array(s).astype(mx.float16), mx.array(b).astype(mx.float16),
                         group_size=32, bits=bits).astype(mx.float32)
    assert np.allclose(np.array(half), ref, rtol=2e-3, atol=4e-3 * np.abs(ref).max())


@pytest.mark.parametrize("ttype", EXACT)
def test_exact_type_file_converts_exactly(tmp_path, ttype):
    raw = tiny_file(tmp_path / "m.gguf", ttype)
    convert(tmp_path / "m.gguf", tmp_path / "out", dtype="float32", progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization"]["bits"] == EXACT_BITS[ttype] and config["quantization"]["group_size"] == 32
    got, ref = load_dense(tmp_path / "out"), reference(raw)
    assert set(got) == set(ref)
    for k in ref:
        assert np.array_equal(got[k], ref[k]), k


@pytest.mark.parametrize("ttype", REQUANT)
def test_requantized_types_within_bound(tmp_path, ttype):
    raw = tiny_file(tmp_path / "m.gguf", ttype)
    convert(tmp_path / "m.gguf", tmp_path / "out", progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    bits = REQUANT_BITS[ttype]
    assert config["quantization"]["bits"] == bits and config["quantization"]["group_size"] == 32
    got, ref = load_dense(tmp_path / "out"), reference(raw)
    for k in ref:
        if ref[k].ndim == 2:
            assert rel(got[k], ref[k]) < ERROR_BOUND[bits], k
    # --keep-float: the reference values in float16
    convert(tmp_path / "m.gguf", tmp_path / "float", keep_float=True, progress=False)
    assert "quantization" not in json.loads((tmp_path / "float" / "config.json").read_text())
    got = load_dense(tmp_path / "float")
    for k in ref:
        assert np.allclose(got[k], ref[k].astype(np.float16).astype(np.float32)), k


def test_mixed_file_keeps_each_tensor_its_own(tmp_path):
    """A Q4_K_M-like mix: per-module bits recorded in config.json; a float matrix stays float."""
    types = {"token_embd.weight": "Q6_K", "output.weight": "F16", "blk.0.ffn_down.weight": "Q5_K",
             "blk.1.attn_v.weight": "Q8_0", "blk.1.ffn_up.weight": "Q5_0", "blk.0.attn_q.weight": "IQ4_NL"}
    raw = {}
    for i, (name, w) in enumerate(float_weights(3).items()):
        t = types.get(name, "Q4_K" if w.ndim == 2 else "F32")
        raw[name] = (t, blocks(t, w.shape, i) if t not in ("F32", "F16") else w)
    write_gguf(tmp_path / "m.gguf", raw)
    convert(tmp_path / "m.gguf", tmp_path / "out", dtype="float32", progress=False)
    q = json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]
    assert q["bits"] == 4 and q["group_size"] == 32
    assert q["model.embed_tokens"] == {"group_size": 32, "bits": 8} and q["lm_head"] is False
    assert q["model.layers.0.mlp.down_proj"] == {"group_size": 32, "bits": 5}
    assert q["model.layers.0.self_attn.q_proj"] == {"group_size": 32, "bits": 6}
    got, ref = load_dense(tmp_path / "out"), reference(raw)
    for k in ("model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.v_proj.weight",
              "model.layers.1.mlp.up_proj.weight", "model.layers.1.self_attn.k_proj.weight", "lm_head.weight"):
        assert np.array_equal(got[k], ref[k]), k
    from mlxllama import load

    model, tok = load(str(tmp_path / "out"))
    assert model(mx.array([[4, 5, 6]])).shape == (1, 3, 320)


def test_float_gguf_converts_like_hf(tmp_path):
    raw = tiny_file(tmp_path / "m.gguf", "F16")
    convert(tmp_path / "m.gguf", tmp_path / "out", progress=False)
    q = json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]
    assert (q["bits"], q["group_size"]) == (4, 64)  # the Hugging Face default
    convert(tmp_path / "m.gguf", tmp_path / "mixed", recipe="mixed_3_6", progress=False)
    q = json.loads((tmp_path / "mixed" / "config.json").read_text())["quantization"]
    assert q["bits"] == 3 and q["model.embed_tokens"]["bits"] == 6
    convert(tmp_path / "m.gguf", tmp_path / "f", quantize=False, dtype="float32", progress=False)
    got, ref = load_dense(tmp_path / "f"), reference(raw)
    for k in ref:
        assert np.array_equal(got[k], ref[k]), k


def test_qwen2_with_biases(tmp_path):
    raw = tiny_file(tmp_path / "m.gguf", "Q8_0", arch="qwen2", tied=True)
    convert(tmp_path / "m.gguf", tmp_path / "out", dtype="float32", progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["tie_word_embeddings"] is True
    got, ref = load_dense(tmp_path / "out"), reference(raw, arch="qwen2")
    assert "model.layers.1.self_attn.k_proj.bias" in got
    for k in ref:
        assert np.array_equal(got[k], ref[k]), k
    from mlxllama import load

    model, _ = load(str(tmp_path / "out"))
    assert model(mx.array([[4, 5]])).shape == (1, 2, 320)


# ---------------------------------------------------------------- bad files: one line, nothing written

def _refused(tmp_path, data: bytes, exc, match):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data)
    before = {p.name for p in tmp_path.iterdir()}
    with pytest.raises(exc, match=match) as e:
        convert(bad, tmp_path / "out", progress=False)
    assert "\n" not in str(e.value)
    assert {p.name for p in tmp_path.iterdir()} == before


def test_bad_files(tmp_path):
    tiny_file(tmp_path / "m.gguf", "Q4_K")
    data = (tmp_path / "m.gguf").read_bytes()
    _refused(tmp_path, data[:-4000], WeightsError, "truncated GGUF file .*points past the end")
    _refused(tmp_path, data[:1000], WeightsError, "truncated GGUF file .*header ends early")
    _refused(tmp_path, b"GGML" + data[4:], WeightsError, "not a GGUF file")
    off = _gguf_tensor_type_offset(tmp_path / "m.gguf", "blk.1.ffn_up.weight")
    d = bytearray(data)
    d[off:off + 4] = struct.pack("<I", 99)
    _refused(tmp_path, bytes(d), WeightsError, "blk.1.ffn_up.weight has unknown GGML type 99")
    d = bytearray(data)
    d[off + 4:off + 12] = struct.pack("<Q", 1 << 40)  # data offset far past the end
    _refused(tmp_path, bytes(d), WeightsError, "blk.1.ffn_up.weight points past the end")
    d = bytearray(data)
    d[off - 8:off] = struct.pack("<Q", 1 << 62)  # absurd dimension
    _refused(tmp_path, bytes(d), WeightsError, "blk.1.ffn_up.weight has absurd shape")
    d = bytearray(data)
    d[off:off + 4] = struct.pack("<I", int(T.TQ1_0))  # a real GGML type outside what MLX can take
    _refused(tmp_path, bytes(d), (WeightsError, UnsupportedModelError), "blk.1.ffn_up.weight")


def test_unsupported_architecture(tmp_path):
    write_gguf(tmp_path / "p.gguf", {"token_embd.weight": ("F32", np.zeros((320, 256), np.float32))}, arch="phi3")
    _refused(tmp_path, (tmp_path / "p.gguf").read_bytes(), UnsupportedModelError,
             "GGUF architecture 'phi3' .* is not supported")


def test_cli_one_line(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"GGUF" + b"\0" * 10)
    r = subprocess.run([sys.executable, "-m", "mlxllama", "convert", str(tmp_path / "x.gguf"), "-o",
                        str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "truncated GGUF file" in r.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- memory

# VmHWM, not ru_maxrss: the latter can carry the forking parent's size across exec
RSS_SCRIPT = """
import sys
import mlxllama
from mlxllama.convert import convert
convert(sys.argv[1], sys.argv[2], max_shard_size="32MB", progress=False)
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
print(int(hwm.split()[1]) * 1024)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_rss_below_file_size(tmp_path):
    """A 200 MB Q8_0 file (wide layers of a random llama) converts in less RSS than its size."""
    import gguf_tiny

    rng = np.random.default_rng(0)
    hidden, ffn, layers = 2048, 8192, 3
    shapes = {"token_embd.weight": (8192, hidden), "output_norm.weight": (hidden,)}
    for n in range(layers):
        p = f"blk.{n}."
        shapes.update({p + "attn_norm.weight": (hidden,), p + "ffn_norm.weight": (hidden,),
                       p + "attn_q.weight": (hidden, hidden), p + "attn_k.weight": (512, hidden),
                       p + "attn_v.weight": (512, hidden), p + "attn_output.weight": (hidden, hidden),
                       p + "ffn_gate.weight": (ffn, hidden), p + "ffn_up.weight": (ffn, hidden),
                       p + "ffn_down.weight": (hidden, ffn)})
    raw = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            raw[name] = ("F32", np.ones(shape, np.float32))
            continue
        b = rng.integers(0, 256, (shape[0] * shape[1] // 32, 34), dtype=np.uint8)
        b[:, 0:2] = np.float16(0.001).reshape(1, 1).view(np.uint8)
        raw[name] = ("Q8_0", b.reshape(shape[0], -1))
    old = (gguf_tiny.HIDDEN, gguf_tiny.FFN, gguf_tiny.LAYERS, gguf_tiny.HEADS, gguf_tiny.KV_HEADS, gguf_tiny.VOCAB)
    try:
        gguf_tiny.HIDDEN, gguf_tiny.FFN, gguf_tiny.LAYERS, gguf_tiny.HEADS, gguf_tiny.KV_HEADS = hidden, ffn, layers, 16, 4
        gguf_tiny.VOCAB = 8192
        write_gguf(tmp_path / "big.gguf", raw)
    finally:
        (gguf_tiny.HIDDEN, gguf_tiny.FFN, gguf_tiny.LAYERS, gguf_tiny.HEADS, gguf_tiny.KV_HEADS, gguf_tiny.VOCAB) = old
    del raw
    size = (tmp_path / "big.gguf").stat().st_size
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path / "big.gguf"), str(tmp_path / "out")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    peak = int(r.stdout.split()[-1])
    assert peak < size, f"peak RSS {peak / 2**20:.0f} MiB >= file {size / 2**20:.0f} MiB"
