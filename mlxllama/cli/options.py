"""Options shared by the commands that generate text."""

from __future__ import annotations

import click


def model_options(f):
    f = click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
                     help="Compute dtype (default: float32 on CPU, the checkpoint's half type on GPU).")(f)
    f = click.option("--adapter-path", type=click.Path(), default=None, help="LoRA adapters to apply.")(f)
    f = click.option("--model", "-m", default=None,
                     help="Model folder or Hugging Face repo id (default: SmolLM2-135M-Instruct, fetched on first use).")(f)
    return f


def sampling_options(f):
    f = click.option("--max-kv-size", type=click.IntRange(min=8), default=None,
                     help="Keep at most this many positions in the KV cache (rotating).")(f)
    f = click.option("--prompt-lookup", type=click.IntRange(min=0), default=0,
                     help="Speculative decoding drafting N tokens from n-grams of the prompt (0: off).")(f)
    f = click.option("--draft-model", default=None, help="A small model for speculative decoding.")(f)
    f = click.option("--stop", multiple=True, help="Stop string (repeatable); not printed.")(f)
    f = click.option("--seed", type=int, default=None, help="Seed for reproducible sampling.")(f)
    f = click.option("--repetition-penalty", type=float, default=None, help="Penalty > 0 for repeated tokens (1: off).")(f)
    f = click.option("--min-p", type=click.FloatRange(0, 1, max_open=True), default=0.0, help="Min-p filtering.")(f)
    f = click.option("--top-k", type=click.IntRange(min=0), default=0, help="Top-k filtering (0: off).")(f)
    f = click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, help="Nucleus sampling mass.")(f)
    f = click.option("--temp", "--temperature", "temp", type=click.FloatRange(min=0), default=0.0,
                     help="Sampling temperature (0: greedy).")(f)
    f = click.option("--max-tokens", "-n", type=click.IntRange(min=0), default=256, help="Most tokens to generate.")(f)
    return f


def sampling_kwargs(o: dict) -> dict:
    return dict(
        max_tokens=o["max_tokens"], temp=o["temp"], top_p=o["top_p"], top_k=o["top_k"], min_p=o["min_p"],
        repetition_penalty=o["repetition_penalty"], seed=o["seed"], stop=list(o["stop"]) or None,
        max_kv_size=o["max_kv_size"], prompt_lookup=o["prompt_lookup"],
    )


def load_draft(path):
    if path is None:
        return None
    from ..loader import load_model

    return load_model(path, fuse=True)[0]


def kv_options(f):
    f = click.option("--quantized-kv-start", type=click.IntRange(min=0), default=0, show_default=True,
                     help="With --kv-bits: quantize the KV cache once it holds this many positions.")(f)
    f = click.option("--kv-group-size", type=int, default=64, show_default=True,
                     help="With --kv-bits: values per quantization group (32, 64 or 128).")(f)
    f = click.option("--kv-bits", type=int, default=None,
                     help="Store the KV cache quantized to 4 or 8 bits (default: full precision).")(f)
    return f


def kv_kwargs(o: dict) -> dict:
    """The KV settings, checked (a bad value is one line naming the allowed ones)."""
    from ..errors import InputError
    from ..models.cache import check_kv_quantization

    try:
        check_kv_quantization(o["kv_bits"], o["kv_group_size"])
    except ValueError as e:
        raise InputError(str(e).replace("kv bits", "--kv-bits").replace("kv group size", "--kv-group-size")) from None
    return dict(kv_bits=o["kv_bits"], kv_group_size=o["kv_group_size"], quantized_kv_start=o["quantized_kv_start"])


def prompt_cache_options(f):
    f = click.option("--no-prompt-cache", is_flag=True, help="Neither read nor write the prompt cache.")(f)
    f = click.option("--prompt-cache-bytes", default="2GB", show_default=True,
                     help="Most bytes the prompt cache keeps (least recently used entries go first).")(f)
    return f


def cache_bytes(o: dict) -> int:
    from ..engine.disk import parse_bytes
    from ..errors import InputError

    try:
        return parse_bytes(o["prompt_cache_bytes"])
    except ValueError as e:
        raise InputError(f"--prompt-cache-bytes: {e}") from None


def session_prefix_cache(llm, tokenizer, o: dict):
    """The disk-backed prefix cache for qa and chat, or None with --no-prompt-cache."""
    if o["no_prompt_cache"]:
        return None
    from ..engine.disk import disk_prefix_cache

    return disk_prefix_cache(llm, tokenizer, cache_bytes(o))
