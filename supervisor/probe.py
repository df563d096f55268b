"""The worker seen from outside: resident memory and CPU use, through psutil."""

from __future__ import annotations

import psutil

from protocol.replies import MemoryStats

from .results import WorkerStats

__all__ = ["ProcessProbe"]


class ProcessProbe:
    """psutil's view of one child. Created at spawn, so CPU use is measured
    from then (``cpu_percent`` is the use since the previous call)."""

    __slots__ = ("pid", "_proc")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            self._proc: psutil.Process | None = psutil.Process(pid)
            self._proc.cpu_percent(None)
        except psutil.Error:
            self._proc = None

    def rss(self) -> int | None:
        """Resident set size in bytes; None once the process is gone."""
        if self._proc is None:
            return None
        try:
            return int(self._proc.memory_info().rss)
        except psutil.Error:
            return None

    def cpu_percent(self) -> float:
        if self._proc is None:
            return 0.0
        try:
            return float(self._proc.cpu_percent(None))
        except psutil.Error:
            return 0.0

    def stats(self, mlx: MemoryStats | None) -> WorkerStats:
        """A snapshot of the process, with the worker's own MLX memory report."""
        return WorkerStats(
            pid=self.pid, rss_bytes=self.rss() or 0, cpu_percent=self.cpu_percent(), mlx=mlx
        )
