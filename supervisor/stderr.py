"""The worker's stderr: forwarded to ``logging`` line by line, with a bounded tail.

``StderrLog`` is fed raw chunks by whichever thread or task drains the pipe.
Each complete line goes to the logger ``supervisor.worker`` at INFO (lines
are cut at 4 KiB; splitting is skipped entirely while INFO is disabled, so a
flood costs little). The last ``tail_bytes`` bytes are kept for
:class:`~supervisor.errors.WorkerCrashed`.
"""

from __future__ import annotations

import logging

__all__ = ["StderrLog", "TAIL_BYTES"]

TAIL_BYTES = 8192
MAX_LOG_LINE = 4096

worker_log = logging.getLogger("supervisor.worker")


class StderrLog:
    __slots__ = ("_pid", "_tail", "_tail_bytes", "_partial", "total_bytes")

    def __init__(self, *, pid: int, tail_bytes: int = TAIL_BYTES) -> None:
        self._pid = pid
        self._tail = bytearray()
        self._tail_bytes = tail_bytes
        self._partial = b""
        self.total_bytes = 0

    def feed(self, chunk: bytes) -> None:
        self.total_bytes += len(chunk)
        tail = self._tail
        tail += chunk
        if len(tail) > self._tail_bytes:
            del tail[: len(tail) - self._tail_bytes]
        if not worker_log.isEnabledFor(logging.INFO):
            self._partial = b""
            return
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()[:MAX_LOG_LINE]
        for line in lines:
            self._log(line)

    def close(self) -> None:
        """End of stderr: log an unterminated last line."""
        if self._partial:
            self._log(self._partial)
            self._partial = b""

    def _log(self, line: bytes) -> None:
        line = line.rstrip(b"\r")
        if line:
            text = line[:MAX_LOG_LINE].decode("utf-8", "replace")
            worker_log.info("[worker %d] %s", self._pid, text, extra={"worker_pid": self._pid})

    @property
    def tail(self) -> str:
        """The last bytes of stderr, decoded leniently."""
        return bytes(self._tail).decode("utf-8", "replace")
