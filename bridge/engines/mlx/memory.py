"""MLX memory as the mlx-lm and the mlx-vlm engine read and free it.

``memory_stats`` runs on the stdin thread and never imports MLX: before the
engine thread has imported it, MLX's figures read 0. ``free_cache`` and
``clear_streams`` run on the engine thread after a model is dropped.
"""

from __future__ import annotations

import gc
import sys

from protocol.replies import MemoryStats, PromptCacheStats

__all__ = ["available_memory", "clear_streams", "free_cache", "memory_stats"]


def memory_stats(prompt_cache: PromptCacheStats | None = None) -> MemoryStats:
    """MLX's active, peak and cache bytes and the process's resident size."""
    import psutil

    rss = int(psutil.Process().memory_info().rss)
    mx = sys.modules.get("mlx.core")
    if mx is None:
        return MemoryStats(
            active_bytes=0, peak_bytes=0, cache_bytes=0, rss_bytes=rss, prompt_cache=prompt_cache
        )
    return MemoryStats(
        active_bytes=int(mx.get_active_memory()),
        peak_bytes=int(mx.get_peak_memory()),
        cache_bytes=int(mx.get_cache_memory()),
        rss_bytes=rss,
        prompt_cache=prompt_cache,
    )


def available_memory(budget: int | None, *, freed: int) -> int:
    """``budget`` when set, else the system's available memory plus ``freed``
    (the weights of the model that a load replaces)."""
    if budget is not None:
        return budget
    import psutil

    return int(psutil.virtual_memory().available) + freed


def free_cache() -> None:
    """Collect the dropped model and give MLX's cached buffers back."""
    gc.collect()
    import mlx.core as mx

    mx.clear_cache()


def clear_streams() -> None:
    """Release MLX's streams at shutdown, if MLX was ever imported."""
    mx = sys.modules.get("mlx.core")
    if mx is not None:
        mx.clear_streams()
