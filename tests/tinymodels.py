"""Tiny random Llama-family models written to disk in the on-disk (mlx-community) format."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxllama.models.llama import Model, ModelArgs

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

BASE = dict(
    model_type="llama",
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)

CONFIGS = {
    "gqa_tied": {},
    "untied": {"tie_word_embeddings": False, "num_key_value_heads": 4},
    "qwen2_bias": {"model_type": "qwen2", "num_key_value_heads": 1},
    "llama3_rope": {
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        "rope_theta": 500000.0,
    },
    "linear_rope_head_dim": {"rope_scaling": {"type": "linear", "factor": 2.0}, "head_dim": 32},
    "mistral": {"model_type": "mistral", "num_key_value_heads": 1},
}


def byte_level_tokenizer_json() -> dict:
    """A byte-level BPE tokenizer over the 256 byte symbols, with a few merges and chat specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL)
    return json.loads(tok.to_str())


def write_tokenizer(path: Path) -> None:
    (path / "tokenizer.json").write_text(json.dumps(byte_level_tokenizer_json()))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "add_bos_token": False, "chat_template": CHAT_TEMPLATE,
    }))


def make_model(name: str = "gqa_tied", seed: int = 0, **overrides) -> tuple[Model, dict]:
    config = {**BASE, **CONFIGS[name], **overrides}
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    # larger-than-default init so logits are not all near zero
    params = [(k, mx.random.normal(v.shape) * (0.02 if "norm" not in k else 0.1) + (1.0 if "norm" in k else 0.0))
              for k, v in tree_flatten(model.parameters())]
    model.load_weights(params)
    mx.eval(model.parameters())
    return model, config


def write_model(path: Path, name: str = "gqa_tied", quantize: dict | None = None, seed: int = 0,
                tokenizer: bool = True, **overrides) -> Path:
    """Writes config.json, model.safetensors (and tokenizer files); returns path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model, config = make_model(name, seed, **overrides)
    if quantize:
        nn.quantize(model, group_size=quantize["group_size"], bits=quantize["bits"])
        config["quantization"] = dict(quantize)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer:
        write_tokenizer(path)
    return path


def scale_weights(path: Path, factor: float) -> Path:
    """Multiplies every weight but the norms by `factor` (greedy text that depends on its whole
    context, instead of one repeated byte)."""
    weights = mx.load(str(Path(path) / "model.safetensors"))
    mx.save_safetensors(str(Path(path) / "model.safetensors"),
                        {k: v if "norm" in k else v * factor for k, v in weights.items()}, metadata={"format": "mlx"})
    return Path(path)
