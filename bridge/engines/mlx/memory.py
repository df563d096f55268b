"""MLX memory as the mlx-lm and the mlx-vlm engine read and free it.

``memory_stats`` runs on the stdin thread and never imports MLX: before the
engine thread has imported it, MLX's figures read 0. ``free_cache`` and
``clear_streams`` run on the engine thread after a model is dropped.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from typing import Any

from bridge.engines.engine_protocol import LoadStep
from protocol.replies import MemoryStats, PromptCacheStats

__all__ = [
    "available_memory",
    "clear_streams",
    "free_cache",
    "kv_budget",
    "memory_stats",
    "read_weights",
]


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


def peak_memory() -> int:
    """Peak bytes MLX has used (for ``done``)."""
    import mlx.core as mx

    return int(mx.get_peak_memory())


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


def kv_budget(budget: int | None, *, weights: int, share: float) -> int:
    """Bytes the KV caches of all running sequences may take, right after a
    load: ``budget`` (``--memory-budget``) less the weights when set, else
    ``share`` of the memory still free (the GPU's on CUDA, the system's on
    the CPU and on Apple silicon's unified memory)."""
    if budget is not None:
        return max(0, budget - weights)
    import mlx.core as mx

    free = available_memory(None, freed=0)
    if mx.default_device().type == mx.DeviceType.gpu and mx.cuda.is_available():
        info = mx.device_info()
        total = info.get("memory_size", info.get("total_memory"))
        if isinstance(total, int) and total > 0:
            free = total - int(mx.get_active_memory())
    return max(0, int(free * share))


def read_weights(model: Any, total: int, report: Callable[[LoadStep], None]) -> None:
    """Evaluate a lazily loaded model's parameters (reading the weights from
    disk), in about 16 groups, reporting the bytes read after each."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    leaves = [v for _, v in tree_flatten(model.parameters())]
    group = max(1, total // 16)
    done = 0
    pending: list[Any] = []
    pending_bytes = 0
    for leaf in leaves:
        pending.append(leaf)
        pending_bytes += int(leaf.nbytes)
        if pending_bytes >= group:
            mx.eval(pending)
            done += pending_bytes
            pending, pending_bytes = [], 0
            report(LoadStep(step="weights", done=done, total=max(total, done), unit="bytes"))
    if pending:
        mx.eval(pending)
        done += pending_bytes
    report(LoadStep(step="weights", done=done, total=max(total, done), unit="bytes"))
