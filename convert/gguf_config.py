"""GGUF <-> Hugging Face: architecture metadata <-> config.json, tensor names, llama.cpp's Q/K row order.

Architectures: llama (and mistral, which llama.cpp writes as llama), qwen2 (q/k/v biases, rows not
permuted). llama.cpp stores the Q and K rows of llama models permuted for its rope layout.
"""

from __future__ import annotations

import math
import re

import mlx.core as mx
import numpy as np

from mlxllama.errors import UnsupportedModelError, WeightsError

# GGUF architecture -> (config model_type, HF architectures entry)
ARCHITECTURES = {"llama": ("llama", "LlamaForCausalLM"), "mistral": ("llama", "LlamaForCausalLM"),
                 "qwen2": ("qwen2", "Qwen2ForCausalLM")}
PERMUTED = {"llama"}  # model types whose Q/K rows llama.cpp permutes

TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
BLOCK = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
IGNORED = {"rope_freqs"}  # llama 3.1 precomputed rope factors: not representable in config.json here
_HF_TOP = {v: k for k, v in TOP.items()}
_HF_BLOCK = {v: k for k, v in BLOCK.items()}


def hf_module(gguf_module: str) -> str | None:
    """'blk.3.attn_q' -> 'model.layers.3.self_attn.q_proj'; None for names outside the Llama layout."""
    if gguf_module in TOP:
        return TOP[gguf_module]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", gguf_module)
    if m and m.group(2) in BLOCK:
        return f"model.layers.{m.group(1)}.{BLOCK[m.group(2)]}"
    return None


def gguf_module(hf: str) -> str | None:
    """The inverse of hf_module."""
    if hf in _HF_TOP:
        return _HF_TOP[hf]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf)
    if m and m.group(2) in _HF_BLOCK:
        return f"blk.{m.group(1)}.{_HF_BLOCK[m.group(2)]}"
    return None


def unpermute(w, n_heads: int):
    """Undo llama.cpp's Q/K row permutation. w: (out, ...) with out = n_heads * head_dim."""
    out, rest = w.shape[0], tuple(w.shape[1:])
    return w.reshape(n_heads, out // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(out, *rest)


def permute(w, n_heads: int):
    """Hugging Face Q/K rows -> llama.cpp's rope layout (what its converter does)."""
    out, rest = w.shape[0], tuple(w.shape[1:])
    return w.reshape(n_heads, 2, out // n_heads // 2, *rest).swapaxes(1, 2).reshape(out, *rest)


def rope_heads(module: str, config: dict) -> int | None:
    """Heads to (un)permute a Q/K tensor of `module` by, or None."""
    if config["model_type"] not in PERMUTED:
        return None
    if module.endswith(("attn_q", "q_proj")):
        return config["num_attention_heads"]
    if module.endswith(("attn_k", "k_proj")):
        return config["num_key_value_heads"]
    return None


def scalar(md: dict, key: str, default=None):
    v = md.get(key, default)
    if isinstance(v, (np.ndarray, np.generic, mx.array)) and v.size == 1:
        v = v.item()
    if isinstance(v, float):  # float32 metadata: keep its shortest decimal (1e-05, not 9.9999997e-06)
        v = float(f"{v:.7g}")
    return v


def _shown(v) -> str:
    text = repr(v.tolist() if isinstance(v, np.ndarray) else v)
    return text if len(text) <= 40 else text[:37] + "..."


def _wrong(path, key: str, what: str, v):
    return WeightsError(f"corrupt GGUF file {path}: metadata {key} must be {what}, got {_shown(v)}")


def meta_int(md: dict, key: str, path, default=None, low: int = 0):
    """An integer metadata value (>= low), the default when absent, else one WeightsError line."""
    v = scalar(md, key, default)
    if v is None or v is default:
        return v
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise _wrong(path, key, f"an integer >= {low}", v)
    return v


def meta_float(md: dict, key: str, path, default=None):
    v = scalar(md, key, default)
    if v is None or v is default:
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _wrong(path, key, "a finite number", v)
    return float(v)


def meta_str(md: dict, key: str, path, default=None):
    v = scalar(md, key, default)
    if v is not None and not isinstance(v, str):
        raise _wrong(path, key, "a string", v)
    return v


def meta_list(md: dict, key: str, path, kind: str, length: int | None = None):
    """An array value: kind "str" (a list of strings) or "num" (a numeric array); None when absent."""
    v = md.get(key)
    if v is None:
        return None
    ok = (isinstance(v, list) and all(isinstance(x, str) for x in v)) if kind == "str" else (
        isinstance(v, np.ndarray) and v.ndim == 1 and v.dtype.kind in "biuf")
    if not ok:
        raise _wrong(path, key, "an array of strings" if kind == "str" else "an array of numbers", v)
    if length is not None and len(v) != length:
        raise WeightsError(f"corrupt GGUF file {path}: metadata {key} has {len(v)} entries for {length} tokens")
    return v


def architecture(md: dict, path) -> str:
    arch = scalar(md, "general.architecture")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise UnsupportedModelError(f"GGUF architecture {_shown(arch)} in {path} is not supported "
                                    f"(supported: {', '.join(ARCHITECTURES)})")
    return arch


def config_from_metadata(md: dict, has_output: bool, path) -> dict:
    arch = architecture(md, path)
    model_type, hf_arch = ARCHITECTURES[arch]

    def need(key):
        v = meta_int(md, f"{arch}.{key}", path, low=1)
        if v is None:
            raise WeightsError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return v

    hidden, heads = need("embedding_length"), need("attention.head_count")
    tokens = meta_list(md, "tokenizer.ggml.tokens", path, "str")
    config = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta_int(md, f"{arch}.attention.head_count_kv", path, heads, low=1),
        "head_dim": meta_int(md, f"{arch}.attention.key_length", path, hidden // heads, low=1),
        "rms_norm_eps": meta_float(md, f"{arch}.attention.layer_norm_rms_epsilon", path, 1e-5),
        "rope_theta": meta_float(md, f"{arch}.rope.freq_base", path, 10000.0),
        "max_position_embeddings": meta_int(md, f"{arch}.context_length", path, 2048, low=1),
        "vocab_size": meta_int(md, f"{arch}.vocab_size", path, len(tokens) if tokens is not None else 0),
        "tie_word_embeddings": not has_output,
        "hidden_act": "silu",
    }
    if model_type == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    else:
        config.update(use_sliding_window=False)
    if meta_str(md, f"{arch}.rope.scaling.type", path) == "linear":
        config["rope_scaling"] = {"type": "linear",
                                  "factor": meta_float(md, f"{arch}.rope.scaling.factor", path, 1.0)}
    for key in ("bos", "eos", "padding"):
        v = meta_int(md, f"tokenizer.ggml.{key}_token_id", path)
        if v is not None:
            config["pad_token_id" if key == "padding" else f"{key}_token_id"] = v
    return config


def metadata_from_config(config: dict) -> tuple[str, dict]:
    """(GGUF architecture, its `arch.*` keys) for writing a GGUF of an MLX model."""
    model_type = config["model_type"]
    arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}.get(model_type)
    if arch is None:
        raise UnsupportedModelError(f"model_type '{model_type}' cannot be exported to GGUF (supported: llama, "
                                    "mistral, qwen2)")
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    keys = {
        "context_length": int(config.get("max_position_embeddings", 2048)),
        "embedding_length": config["hidden_size"],
        "block_count": config["num_hidden_layers"],
        "feed_forward_length": config["intermediate_size"],
        "attention.head_count": heads,
        "attention.head_count_kv": config.get("num_key_value_heads") or heads,
        "attention.key_length": head_dim,
        "attention.value_length": head_dim,
        "rope.dimension_count": head_dim,
        "rope.freq_base": float(config.get("rope_theta", 10000.0)),
        "attention.layer_norm_rms_epsilon": float(config.get("rms_norm_eps", 1e-5)),
        "vocab_size": config["vocab_size"],
    }
    scaling = config.get("rope_scaling") or {}
    if scaling.get("type", scaling.get("rope_type")) == "linear":
        keys["rope.scaling.type"] = "linear"
        keys["rope.scaling.factor"] = float(scaling["factor"])
    elif scaling:
        raise UnsupportedModelError(f"rope_scaling {scaling} cannot be exported to GGUF here (only linear)")
    return arch, keys
