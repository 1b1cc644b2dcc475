"""The one generation engine every caller shares: batched decoding (core.BatchEngine over
batch.PaddedBatch), per-sequence text streams (text.TextStream), the prefix cache in memory
(prefix_cache.PrefixCache) and on disk (disk.DiskCache), and prompt-cache files (files)."""

from .batch import KVQuant, padding_mask
from .core import BatchEngine, Output
from .prefix_cache import Hit, PrefixCache, kind_of
from .text import StopMatcher, TextStream

__all__ = ["BatchEngine", "Hit", "KVQuant", "Output", "PrefixCache", "StopMatcher", "TextStream", "kind_of",
           "padding_mask"]
