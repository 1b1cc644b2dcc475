"""export-gguf: MLX folder -> GGUF -> MLX folder is exact for 4-, 5- and imported 8-bit weights; llama.cpp
(llama-cpp-python, when installed) loads the file and its greedy tokens match ours."""

from __future__ import annotations

import json
import subprocess
import sys

import mlxllama._platform  # noqa: F401
import mlx.core as mx
import numpy as np
import pytest
from gguf import quants
from gguf.constants import GGMLQuantizationType as T

from gguf_tiny import float_weights, write_gguf
from mlxllama.convert import convert, export_gguf
from mlxllama.convert.gguf_reader import GGUFFile
from mlxllama.errors import ConversionError
from test_gguf import load_dense, tiny_file


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (5, 32), (8, 64)])
def test_round_trip(tmp_path, bits, group):
    tiny_file(tmp_path / "f.gguf", "F16")
    convert(tmp_path / "f.gguf", tmp_path / "mlx", bits=bits, group_size=group, progress=False)
    export_gguf(tmp_path / "mlx", tmp_path / "out.gguf")
    g = GGUFFile(tmp_path / "out.gguf")
    want = {4: "Q4_1", 5: "Q5_1", 8: "Q8_0"}[bits]
    assert {t.type for t in g.tensors if len(t.shape) == 2} == {want}
    assert g.metadata["tokenizer.ggml.model"] == "gpt2" and "tokenizer.chat_template" in g.metadata
    convert(tmp_path / "out.gguf", tmp_path / "back", progress=False)
    a, b = load_dense(tmp_path / "mlx"), load_dense(tmp_path / "back")
    assert set(a) == set(b)
    for k in a:
        if bits == 8 and a[k].ndim == 2:  # Q8_0 is llama.cpp's symmetric rounding of the 8-bit values
            assert np.abs(a[k] - b[k]).max() <= 0.01 * np.abs(a[k]).max(), k
        else:
            assert np.array_equal(a[k], b[k]), k
    # gguf-py reads our blocks as the same values (MLX computed them in float16: its rounding)
    t = next(t for t in g.tensors if t.name == "blk.0.ffn_down.weight")
    ref = quants.dequantize(np.array(g.data(t)), T[t.type])
    w = a["model.layers.0.mlp.down_proj.weight"]
    assert np.abs(ref - w).max() <= (0.01 if bits == 8 else 1e-3) * np.abs(w).max()


def test_exported_tokenizer_matches(tmp_path):
    tiny_file(tmp_path / "f.gguf", "Q4_0")
    convert(tmp_path / "f.gguf", tmp_path / "mlx", progress=False)
    export_gguf(tmp_path / "mlx", tmp_path / "out.gguf")
    a, b = GGUFFile(tmp_path / "f.gguf").metadata, GGUFFile(tmp_path / "out.gguf").metadata
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template",
                "tokenizer.ggml.eos_token_id", "llama.rope.freq_base", "llama.attention.head_count_kv"):
        assert np.array_equal(np.asarray(a[key]), np.asarray(b[key])), key
    assert list(a["tokenizer.ggml.token_type"]) == list(b["tokenizer.ggml.token_type"])


def test_sentencepiece_vocab_round_trip(tmp_path):
    """A sentencepiece ("llama") GGUF vocabulary survives import -> export -> import."""
    from tokenizers import Tokenizer

    from test_convert import make_gguf, sentencepiece_vocab

    sp, md = sentencepiece_vocab(tmp_path)
    make_gguf(tmp_path / "m.gguf", md)
    convert(tmp_path / "m.gguf", tmp_path / "a", progress=False)
    export_gguf(tmp_path / "a", tmp_path / "e.gguf")
    g = GGUFFile(tmp_path / "e.gguf").metadata
    assert g["tokenizer.ggml.model"] == "llama" and list(g["tokenizer.ggml.token_type"]) == md["tokenizer.ggml.token_type"].tolist()
    convert(tmp_path / "e.gguf", tmp_path / "b", progress=False)
    a, b = Tokenizer.from_file(str(tmp_path / "a" / "tokenizer.json")), Tokenizer.from_file(str(tmp_path / "b" / "tokenizer.json"))
    for text in ["the quick brown fox jumps", "Then  the dog sleeps, in the sun!", "zebra ünïcödé 東京 42"]:
        assert a.encode(text).ids == b.encode(text).ids == [sp.bos_id()] + sp.encode(text), text


def test_export_refuses_existing_and_leaves_nothing(tmp_path):
    tiny_file(tmp_path / "f.gguf", "Q8_0")
    convert(tmp_path / "f.gguf", tmp_path / "mlx", progress=False)
    (tmp_path / "out.gguf").write_text("x")
    with pytest.raises(ConversionError, match="already exists"):
        export_gguf(tmp_path / "mlx", tmp_path / "out.gguf")
    before = sorted(p.name for p in tmp_path.iterdir())
    r = subprocess.run([sys.executable, "-m", "mlxllama", "export-gguf", str(tmp_path / "nope"), "-o",
                        str(tmp_path / "x.gguf")], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_fuse_help_mentions_export():
    r = subprocess.run([sys.executable, "-m", "mlxllama", "fuse", "--help"], capture_output=True, text=True)
    assert "--export-gguf" in r.stdout


# ---------------------------------------------------------------- llama.cpp (skipped without xllamacpp)

TEXTS = ["The capital of France is Paris. The capital of Italy is Rome, and the capital of Spain is",
         "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
         "Water boils at 100 degrees Celsius at sea level. At higher altitudes, water boils at"]


def ours_next_tokens(folder, tokens: list[int]) -> np.ndarray:
    from mlxllama import load

    model, _ = load(str(folder))
    return np.array(model(mx.array([tokens])).astype(mx.float32)[0].argmax(-1))


def require_llama_cpp() -> None:
    """Skip unless a llama.cpp binding (xllamacpp, or a llama-cpp-python build that decodes here) runs."""
    from pathlib import Path

    from mlxllama.bench import llamacpp

    probe = Path(__file__).parent / "data" / "gguf" / "tiny-Q6_K.gguf"
    if llamacpp.backend(str(probe)) is None:
        pytest.skip("no llama.cpp binding runs here (pip install xllamacpp)")


def agreement(folder, gguf, texts=TEXTS) -> tuple[int, int]:
    """Positions where our greedy next token equals llama.cpp's on the GGUF file, and their count."""
    from mlxllama import load
    from mlxllama.bench import llamacpp

    _, tok = load(str(folder))
    lists = [tok.encode(text) for text in texts]
    theirs = llamacpp.next_tokens(gguf, lists)
    agree = sum(int((ours_next_tokens(folder, t) == np.array(b)).sum()) for t, b in zip(lists, theirs))
    return agree, sum(len(t) for t in lists)


@pytest.mark.slow
def test_llama_cpp_reads_our_export(default_model_dir, tmp_path):
    """llama.cpp's next tokens on our export of the default model are those it gives on the GGUF the
    model came from (the weights go back exactly), ours agree with them but for near-ties of llama.cpp's
    8-bit activations, and so do llama.cpp's greedy tokens."""
    require_llama_cpp()
    from mlxllama import load
    from mlxllama.bench import llamacpp
    from mlxllama.convert import fetch_default_gguf
    from mlxllama.paths import cache_home

    export_gguf(default_model_dir, tmp_path / "m.gguf")
    model, tok = load(str(default_model_dir))
    lists = [tok.encode(text) for text in TEXTS]
    assert llamacpp.next_tokens(tmp_path / "m.gguf", lists) == llamacpp.next_tokens(fetch_default_gguf(cache_home()), lists)
    agree, total = agreement(default_model_dir, tmp_path / "m.gguf")
    assert agree >= total - 4, f"{agree} of {total} next tokens agree"
    # llama.cpp's greedy continuation, read by our model: each of its tokens is our greedy choice, or
    # within a near-tie of it (our logit gap below 0.3), and most are exactly ours
    prompt = tok.encode("The capital of France is")
    theirs = llamacpp.generate(tmp_path / "m.gguf", prompt, 24)
    logits = model(mx.array([prompt + theirs])).astype(mx.float32)[0, len(prompt) - 1:-1]  # (24, V)
    gaps = np.array(logits.max(-1) - logits[mx.arange(len(theirs)), mx.array(theirs)])
    assert gaps.max() < 0.3 and (gaps == 0).sum() >= len(theirs) - 3, gaps.round(3)
