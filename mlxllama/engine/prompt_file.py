"""A prompt's KV cache in a file, as mlx-lm's `cache_prompt` makes it and `generate
--prompt-cache-file` continues from it.

With a chat template the file holds the rendered chat up to the end of the cached text inside an
open user message (mlx-lm renders `[{"role": "user", "content": prompt}]` with
continue_final_message); a later prompt continues that user message: what is fed is the
rendering of the whole conversation from where the user's content begins.
"""

from __future__ import annotations

import os

import mlx.core as mx

from ..errors import InputError
from ..models import make_cache
from ..models.cache import maybe_quantize
from .batch import KVQuant, caches_from_states
from .files import check_fits, load_prompt_cache, save_prompt_cache
from .prefix_cache import kind_of

QUERY = "<query>"


def cached_prompt_tokens(tokenizer, prompt: str, use_chat_template: bool = True) -> list[int]:
    if not prompt.strip():
        raise InputError("the prompt is empty")
    if use_chat_template and tokenizer.has_chat_template:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                                  add_generation_prompt=False, continue_final_message=True))
    return tokenizer.encode(prompt)


def cache_prompt(model, tokenizer, prompt: str, path: str | os.PathLike, *, use_chat_template: bool = True,
                 model_name: str | None = None, kv_bits: int | None = None, kv_group_size: int = 64,
                 quantized_kv_start: int = 0, step: int = 512) -> int:
    """Runs the prompt through the model and writes its KV cache to `path`; returns its tokens."""
    tokens = cached_prompt_tokens(tokenizer, prompt, use_chat_template)
    cache = make_cache(model)
    ids = mx.array(tokens, dtype=mx.int32)
    for i in range(0, len(tokens), step):
        model(ids[i : i + step][None], cache=cache)
        maybe_quantize(cache, kv_bits, kv_group_size, quantized_kv_start)
        mx.eval([c.state for c in cache])
    bits = getattr(cache[0], "bits", None)
    name = str(model_name) if model_name and os.path.isdir(str(model_name)) else getattr(model, "model_dir", "")
    save_prompt_cache(path, [c.state for c in cache], kind_of(bits, kv_group_size), tokens=tokens,
                      model=model, tokenizer=tokenizer, metadata={"model": name, "tokenizer_config": "{}"})
    return len(tokens)


def continuation_tokens(tokenizer, prompt: str, system_prompt: str | None = None,
                        use_chat_template: bool = True) -> list[int]:
    """The tokens to feed after a cached prompt (mlx-lm's rule, see the module docstring)."""
    if not prompt.strip():
        raise InputError("the prompt is empty")
    if not (use_chat_template and tokenizer.has_chat_template):
        return tokenizer.encode(prompt, add_special_tokens=False)
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
    full = tokenizer.apply_chat_template(messages + [{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    probe = tokenizer.apply_chat_template(messages + [{"role": "user", "content": QUERY}], tokenize=False,
                                          add_generation_prompt=True)
    return tokenizer.encode(full[probe.index(QUERY):], add_special_tokens=False)


def load_cache_file(model, tokenizer, path: str | os.PathLike, kv_bits: int | None = None,
                    kv_group_size: int = 64) -> list:
    """The per-layer caches in `path`, checked against the model (CacheFileError otherwise)."""
    states, kind, meta = load_prompt_cache(path)
    check_fits(path, states, model, tokenizer, meta)
    if kind != "float":
        bits, group = (int(x) for x in kind[1:].split("g"))
        if (kv_bits is not None and kv_bits != bits) or kv_group_size != group:
            raise InputError(f"{path} holds a {bits}-bit KV cache in groups of {group}: pass --kv-bits {bits} "
                             f"--kv-group-size {group}, or none")
        return caches_from_states(model, states, KVQuant(bits, group))
    dtype = model.model.norm.weight.dtype if hasattr(model, "model") else states[0][0].dtype
    return caches_from_states(model, [(k.astype(dtype), v.astype(dtype)) for k, v in states])
