"""Process figures reported by generation, training and the benchmarks: peak memory, load average."""

from __future__ import annotations

import os
import resource
import sys

import mlx.core as mx


def rss_peak_gb() -> float:
    """The process's peak resident set size, in GB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (rss if sys.platform == "darwin" else rss * 1024) / 1e9


def peak_memory_gb() -> float:
    """MLX's peak allocation, or the peak RSS on backends without an allocator count (CPU)."""
    peak = mx.get_peak_memory()
    return peak / 1e9 if peak else rss_peak_gb()


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the platform has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
