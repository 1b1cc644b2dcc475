"""A GGUF file (Llama architecture) as a Source.

`mx.load(path, return_metadata=True)` gives Q4_0/Q4_1/Q4_K/Q8_0 tensors already as MLX affine
`weight` (uint32 packed) / `scales` / `biases` with group size 32, F16/F32 as they are, and other
quantized types dequantized to float16 where its C loader can. Names are mapped to Hugging Face
ones, and llama.cpp's row permutation of Q and K (its rope layout) is undone on the packed
weight, scales and biases alike (rows are output dimensions).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import mlx.core as mx

from mlxllama.errors import UnsupportedModelError, WeightsError

from .architecture import check_config, check_tensors, expected_shapes
from .gguf_header import read_gguf_header
from .quantize import QuantSpec, packed_spec
from .source import Source, Tensor

PACKED_BY_MLX = {"Q4_0", "Q4_1", "Q4_K", "Q8_0"}
FLOAT_TYPES = {"F32", "F16"}
# float16 after mx.load; the bits to give them back when keeping the file's own precision
_DEQUANTIZED_BITS = {"Q2_K": 2, "Q3_K": 3, "Q5_0": 5, "Q5_1": 5, "Q5_K": 5, "Q6_K": 6, "Q8_1": 8, "Q8_K": 8}

_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_IGNORED = {"rope_freqs"}  # llama 3.1 precomputed rope factors: not representable in config.json here


def hf_module(gguf_module: str) -> str | None:
    """'blk.3.attn_q' -> 'model.layers.3.self_attn.q_proj'; None for names outside the Llama layout."""
    if gguf_module in _TOP:
        return _TOP[gguf_module]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", gguf_module)
    if m and m.group(2) in _BLOCK:
        return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}"
    return None


def unpermute(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's Q/K row permutation. w: (out, ...) with out = n_heads * head_dim."""
    out = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_heads, out // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(out, *rest)


def _scalar(md: dict, key: str, default=None):
    v = md.get(key, default)
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float):  # float32 metadata: keep its shortest decimal (1e-05, not 9.9999997e-06)
        v = float(f"{v:.7g}")
    return v


def config_from_metadata(md: dict, has_output: bool, path: Path) -> dict:
    arch = _scalar(md, "general.architecture")
    if arch != "llama":
        raise UnsupportedModelError(f"GGUF architecture '{arch}' in {path} is not supported (supported: llama)")

    def need(key):
        v = _scalar(md, f"llama.{key}")
        if v is None:
            raise WeightsError(f"{path}: GGUF metadata lacks llama.{key}")
        return v

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    tokens = md.get("tokenizer.ggml.tokens") or []
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_scalar(md, "llama.attention.head_count_kv", heads)),
        "head_dim": int(_scalar(md, "llama.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(_scalar(md, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_scalar(md, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_scalar(md, "llama.context_length", 2048)),
        "vocab_size": int(_scalar(md, "llama.vocab_size", len(tokens))),
        "tie_word_embeddings": not has_output,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }
    if _scalar(md, "llama.rope.scaling.type") == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": float(_scalar(md, "llama.rope.scaling.factor", 1.0))}
    for key in ("bos", "eos", "padding"):
        v = _scalar(md, f"tokenizer.ggml.{key}_token_id")
        if v is not None:
            config["pad_token_id" if key == "padding" else f"{key}_token_id"] = int(v)
    return config


def load_gguf(path: Path):
    """(arrays, metadata, header infos) with typed errors naming the file or tensor type."""
    infos = read_gguf_header(path)
    odd = [i for i in infos if i.type not in PACKED_BY_MLX | FLOAT_TYPES]
    try:
        arrays, md = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError) as e:
        if odd:
            raise UnsupportedModelError(
                f"{path}: GGUF tensor {odd[0].name} has type {odd[0].type}, which mx.load cannot read "
                f"(readable: F32, F16, Q4_0, Q4_1, Q4_K, Q8_0)") from None
        raise WeightsError(f"cannot load GGUF file {path}: {e}") from None
    for info in odd:
        w = arrays.get(info.name)
        if w is None or not mx.issubdtype(w.dtype, mx.floating):
            raise UnsupportedModelError(f"{path}: GGUF tensor {info.name} has unsupported type {info.type}")
    return arrays, md, infos


def open_gguf(path: Path) -> Source:
    path = Path(path)
    arrays, md, infos = load_gguf(path)
    has_output = "output.weight" in arrays
    config = check_config(config_from_metadata(md, has_output, path), str(path))
    expected = expected_shapes(config, tied=not has_output)
    n_heads, n_kv = config["num_attention_heads"], config["num_key_value_heads"]

    tensors: list[Tensor] = []
    found: dict[str, tuple[int, ...]] = {}
    for info in infos:  # file order
        module, _, leaf = info.name.rpartition(".")
        if module in _IGNORED:
            warnings.warn(f"{path}: dropping {info.name} (not representable in config.json)")
            arrays.pop(info.name, None)
            continue
        hf = hf_module(module)
        if hf is None or leaf not in ("weight", "bias"):
            raise WeightsError(f"{path}: unexpected tensor {info.name} for a llama GGUF")
        name = f"{hf}.{leaf}"
        heads = n_heads if module.endswith("attn_q") else n_kv if module.endswith("attn_k") else None
        if info.type in PACKED_BY_MLX and f"{module}.scales" in arrays:
            w = arrays[info.name]
            shape = tuple(info.shape)
            spec = packed_spec(w.shape, arrays[f"{module}.scales"].shape, shape[-1])
            if spec is None:
                raise WeightsError(f"{path}: tensor {info.name} of type {info.type} did not load as affine weights")
            keys = [info.name, f"{module}.scales", f"{module}.biases"]
        else:
            spec, shape, keys = None, tuple(arrays[info.name].shape), [info.name]
        hint = QuantSpec(_DEQUANTIZED_BITS[info.type], 32) if info.type in _DEQUANTIZED_BITS else None
        if hint is None and info.type in PACKED_BY_MLX and spec is None:
            hint = QuantSpec(4 if info.type.startswith("Q4") else 8, 32)
        found[name] = shape
        tensors.append(Tensor(name, shape, _fetcher(arrays, keys, heads), spec, hint))
    check_tensors(found, expected, str(path))
    return Source("gguf", path, config, tensors, "float16", gguf_metadata=md)


def _fetcher(arrays: dict, keys: list[str], heads: int | None):
    def fetch():
        out = [arrays.pop(k) for k in keys]
        if heads is not None:
            out = [unpermute(a, heads) for a in out]
        return out

    return fetch
