"""What a Llama-family checkpoint must contain: config keys, tensor names and shapes.

llama, mistral and qwen2 share one layout (qwen2 adds q/k/v biases; llama may have
attention_bias / mlp_bias). Shapes are the Hugging Face / MLX ones: Linear weights are (out, in).
"""

from __future__ import annotations

import re

from mlxllama.errors import ConfigError, UnsupportedModelError, WeightsError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
REQUIRED_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
DROPPED = re.compile(r".*\.rotary_emb\.inv_freq$")
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)$")


def check_config(config: dict, where: str) -> dict:
    """Validate config.json; return a copy with the defaults the runtime needs filled in."""
    model_type = config.get("model_type")
    if model_type is None:
        raise ConfigError(f"{where} has no 'model_type'")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type '{model_type}' in {where} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    for key in REQUIRED_KEYS:
        if key not in config:
            raise ConfigError(f"{where} lacks required key '{key}'")
        if not isinstance(config[key], int) or isinstance(config[key], bool) or config[key] <= 0:
            raise ConfigError(f"{where}: '{key}' must be a positive integer, got {config[key]!r}")
    qc = config.get("quantization_config")
    if isinstance(qc, dict) and "quant_method" in qc and "quantization" not in config:
        raise UnsupportedModelError(
            f"{where}: checkpoints quantized with quant_method '{qc['quant_method']}' are not supported; "
            "use the float checkpoint")
    config = dict(config)
    config.setdefault("rms_norm_eps", 1e-6)  # the Hugging Face default for all three
    if config.get("num_key_value_heads") is None:
        config["num_key_value_heads"] = config["num_attention_heads"]
    if "head_dim" not in config or config["head_dim"] is None:
        if config["hidden_size"] % config["num_attention_heads"]:
            raise ConfigError(f"{where}: hidden_size is not a multiple of num_attention_heads and no head_dim is given")
        config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    if config["num_attention_heads"] % config["num_key_value_heads"]:
        raise ConfigError(f"{where}: num_attention_heads is not a multiple of num_key_value_heads")
    return config


def expected_shapes(config: dict, tied: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor name the model has, with its (logical, unquantized) shape."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = config["head_dim"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    attn_bias = config["model_type"] == "qwen2" or bool(config.get("attention_bias"))
    mlp_bias = bool(config.get("mlp_bias"))
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not tied:
        shapes["lm_head.weight"] = (v, h)
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        layer = {
            "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
            "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i),
        }
        if attn_bias:
            layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
            if config["model_type"] == "llama":
                layer["self_attn.o_proj.bias"] = (h,)
        if mlp_bias:
            layer.update({"mlp.gate_proj.bias": (i,), "mlp.up_proj.bias": (i,), "mlp.down_proj.bias": (h,)})
        shapes.update({p + k: s for k, s in layer.items()})
    return shapes


def check_tensors(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], where: str) -> None:
    """nanoGPT-style: every expected tensor present with its shape, nothing unknown."""
    for name, shape in expected.items():
        if name not in found:
            raise WeightsError(f"{where} lacks tensor {name} (expected shape {list(shape)})")
        if tuple(found[name]) != tuple(shape):
            raise WeightsError(f"{where}: tensor {name} has shape {list(found[name])}, config says {list(shape)}")
    for name in found:
        if name not in expected:
            raise WeightsError(f"{where}: unexpected tensor {name} for this config")


def is_quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """2-D weights of Linear layers, embed_tokens and lm_head; never norms or biases."""
    return name.endswith(".weight") and len(shape) == 2 and "norm" not in name.rsplit(".", 2)[-2]


def layer_index(name: str) -> int | None:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None
