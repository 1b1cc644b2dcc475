"""A tiny random llama (or qwen2) written as a GGUF file with gguf-py, tensor types chosen per tensor.

Hidden size 256 so that every row is a whole number of K-quant blocks. Used by tests/test_gguf*.py
and by tests/data/gguf/make_fixtures.py (which quantizes the F16 file with llama.cpp).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from gguf import GGUFWriter
from gguf.constants import GGMLQuantizationType as T

from mlxllama.convert.gguf_config import permute

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, VOCAB = 256, 512, 2, 4, 2, 320
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"


def byte_level_vocab() -> tuple[list[str], list[str], list[int]]:
    """(tokens, merges, token types) of the test byte-level BPE with exactly VOCAB tokens."""
    from test_convert import SPECIALS, byte_level_tokenizer

    spec = json.loads(byte_level_tokenizer(VOCAB).to_str())
    tokens = [t for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    return tokens, merges, [3 if t in SPECIALS else 1 for t in tokens]


def float_weights(seed: int = 0, arch: str = "llama", tied: bool = False) -> dict[str, np.ndarray]:
    """GGUF-named float32 weights (Q/K rows in llama.cpp's order for llama), norms and qwen2 biases."""
    rng = np.random.default_rng(seed)
    hd = HIDDEN // HEADS

    def lin(o, n):
        return (rng.standard_normal((o, n)) * 0.05).astype(np.float32)

    w = {"token_embd.weight": lin(VOCAB, HIDDEN), "output_norm.weight": 1 + 0.1 * rng.standard_normal(HIDDEN).astype(np.float32)}
    if not tied:
        w["output.weight"] = lin(VOCAB, HIDDEN)
    for n in range(LAYERS):
        p = f"blk.{n}."
        q, k = lin(HEADS * hd, HIDDEN), lin(KV_HEADS * hd, HIDDEN)
        if arch == "llama":
            q, k = permute(q, HEADS), permute(k, KV_HEADS)
        w.update({p + "attn_norm.weight": np.ones(HIDDEN, np.float32), p + "ffn_norm.weight": np.ones(HIDDEN, np.float32),
                  p + "attn_q.weight": q, p + "attn_k.weight": k, p + "attn_v.weight": lin(KV_HEADS * hd, HIDDEN),
                  p + "attn_output.weight": lin(HIDDEN, HEADS * hd), p + "ffn_gate.weight": lin(FFN, HIDDEN),
                  p + "ffn_up.weight": lin(FFN, HIDDEN), p + "ffn_down.weight": lin(HIDDEN, FFN)})
        if arch == "qwen2":
            w.update({p + "attn_q.bias": 0.1 * rng.standard_normal(HEADS * hd).astype(np.float32),
                      p + "attn_k.bias": 0.1 * rng.standard_normal(KV_HEADS * hd).astype(np.float32),
                      p + "attn_v.bias": 0.1 * rng.standard_normal(KV_HEADS * hd).astype(np.float32)})
    return w


def write_gguf(path: Path, tensors: dict[str, tuple[str, np.ndarray]], arch: str = "llama",
               extra: dict | None = None) -> None:
    """tensors: GGUF name -> (GGML type, array): float32 values for F32/F16, raw bytes (rows, n) otherwise."""
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_vocab_size(VOCAB)
    tokens, merges, types = byte_level_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(TEMPLATE)
    for key, value in (extra or {}).items():
        writer.add_string(key, value) if isinstance(value, str) else writer.add_uint32(key, value)
    for name, (ttype, a) in tensors.items():
        if ttype == "F32":
            writer.add_tensor(name, a.astype(np.float32))
        elif ttype == "F16":
            writer.add_tensor(name, a.astype(np.float16))
        else:
            writer.add_tensor(name, a, raw_dtype=T[ttype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
