"""Random-weight 4-bit models with the shapes of real ones: no download, same work per token.

Weights are drawn directly in the packed 4-bit layout (uint32 words, bf16 scales and biases, group
size 64), so an 8B-shaped model never exists in float and takes a minute to write. The folder looks
like an mlx-community conversion, with the default model's tokenizer, so mlx-lm loads it too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

SHAPES: dict[str, dict] = {
    "smollm2-135m": dict(  # the default model's shape, for machines without it (the H200 runs)
        hidden_size=576, num_hidden_layers=30, intermediate_size=1536, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True,
        max_position_embeddings=8192,
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True,
        rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        max_position_embeddings=131072,
    ),
    "llama-3-8b": dict(
        hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False,
        max_position_embeddings=8192,
    ),
}
GROUP_SIZE, BITS = 64, 4
SHARD_BYTES = 2 << 30


def quantized_params(shape: dict) -> int:
    D, F, V, L = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"], shape["num_hidden_layers"]
    H, Hkv, Dh = shape["num_attention_heads"], shape["num_key_value_heads"], shape.get("head_dim") or D // shape["num_attention_heads"]
    per_layer = D * H * Dh * 2 + D * Hkv * Dh * 2 + 3 * D * F
    return L * per_layer + V * D * (1 if shape.get("tie_word_embeddings", True) else 2)


def _quantized(out_dim: int, in_dim: int, key):
    """(weight uint32 (out, in*bits/32), scales (out, in/gs) bf16, biases) for values near +-0.02."""
    import mlx.core as mx

    shape = (out_dim, in_dim * BITS // 32)
    k1, k2 = mx.random.split(key)
    hi = mx.random.randint(0, 1 << 16, shape, key=k1).astype(mx.uint32)
    lo = mx.random.randint(0, 1 << 16, shape, key=k2).astype(mx.uint32)
    w = (hi << 16) | lo  # uint32 words of eight random 4-bit values
    groups = in_dim // GROUP_SIZE
    scales = mx.full((out_dim, groups), 0.04 / 15, dtype=mx.bfloat16)
    biases = mx.full((out_dim, groups), -0.02, dtype=mx.bfloat16)
    return w, scales, biases


def tensors(shape: dict, seed: int = 0):
    """Yields (name, array) in checkpoint order, layer by layer."""
    import mlx.core as mx

    D, F, V, L = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"], shape["num_hidden_layers"]
    H, Hkv = shape["num_attention_heads"], shape["num_key_value_heads"]
    Dh = shape.get("head_dim") or D // H
    key = mx.random.key(seed)

    def quant(name, out_dim, in_dim):
        nonlocal key
        key, sub = mx.random.split(key)
        w, s, b = _quantized(out_dim, in_dim, sub)
        return [(f"{name}.weight", w), (f"{name}.scales", s), (f"{name}.biases", b)]

    yield from quant("model.embed_tokens", V, D)
    for i in range(L):
        p = f"model.layers.{i}"
        yield from quant(f"{p}.self_attn.q_proj", H * Dh, D)
        yield from quant(f"{p}.self_attn.k_proj", Hkv * Dh, D)
        yield from quant(f"{p}.self_attn.v_proj", Hkv * Dh, D)
        yield from quant(f"{p}.self_attn.o_proj", D, H * Dh)
        yield from quant(f"{p}.mlp.gate_proj", F, D)
        yield from quant(f"{p}.mlp.up_proj", F, D)
        yield from quant(f"{p}.mlp.down_proj", D, F)
        yield f"{p}.input_layernorm.weight", mx.ones((D,), dtype=mx.bfloat16)
        yield f"{p}.post_attention_layernorm.weight", mx.ones((D,), dtype=mx.bfloat16)
    yield "model.norm.weight", mx.ones((D,), dtype=mx.bfloat16)
    if not shape.get("tie_word_embeddings", True):
        yield from quant("lm_head", V, D)


def write_random_model(name: str, out: Path, tokenizer_dir: Path | None, seed: int = 0,
                       shape: dict | None = None) -> Path:
    """Writes the model folder once (config.json last, so a half-written folder is rewritten)."""
    import mlx.core as mx

    out = Path(out)
    if (out / "config.json").is_file():
        return out
    shape = shape or SHAPES[name]
    out.mkdir(parents=True, exist_ok=True)
    shard, size, files, weight_map = {}, 0, [], {}

    def flush():
        nonlocal shard, size
        if shard:
            fname = f"model-{len(files) + 1:05d}.safetensors"
            mx.save_safetensors(str(out / fname), shard, metadata={"format": "mlx"})
            files.append(fname)
            weight_map.update({k: fname for k in shard})
            shard, size = {}, 0

    for k, v in tensors(shape, seed):
        mx.eval(v)
        shard[k] = v
        size += v.nbytes
        if size >= SHARD_BYTES:
            flush()
    flush()
    n = len(files)
    renamed = {}
    for i, f in enumerate(files, 1):
        new = f"model-{i:05d}-of-{n:05d}.safetensors"
        (out / f).rename(out / new)
        renamed[f] = new
    index = {"metadata": {}, "weight_map": {k: renamed[f] for k, f in sorted(weight_map.items())}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer.json").is_file():
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (Path(tokenizer_dir) / f).is_file():
                shutil.copy(Path(tokenizer_dir) / f, out / f)
    else:
        write_byte_tokenizer(out)
    quant = {"group_size": GROUP_SIZE, "bits": BITS}
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "rms_norm_eps": 1e-5,
              "torch_dtype": "bfloat16", **shape, "quantization": quant, "quantization_config": quant}
    tmp = out / "config.json.part"
    tmp.write_text(json.dumps(config, indent=2))
    tmp.rename(out / "config.json")
    return out


CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_byte_tokenizer(out: Path) -> None:
    """A byte-level BPE tokenizer (256 byte symbols, three specials, no merges): enough to drive a
    random-weight model when no real tokenizer is at hand (the device machine has no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    (out / "tokenizer.json").write_text(tok.to_str())
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast"}))
