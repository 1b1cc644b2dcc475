"""Model architectures. Ours: the Llama family (models/llama.py); others come from mlx-lm's zoo."""

from .cache import KVCache, RotatingKVCache
from .llama import Model, ModelArgs, SUPPORTED_MODEL_TYPES


def make_cache(model, max_kv_size: int | None = None) -> list:
    """A fresh per-layer cache for any model that satisfies the model contract."""
    if isinstance(model, Model):
        return model.make_cache(max_kv_size)
    if hasattr(model, "make_cache") and max_kv_size is None:
        return model.make_cache()
    from mlx_lm.models.cache import make_prompt_cache  # fallback zoo models

    return make_prompt_cache(model, max_kv_size)


__all__ = ["KVCache", "RotatingKVCache", "Model", "ModelArgs", "SUPPORTED_MODEL_TYPES", "make_cache"]
