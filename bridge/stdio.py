"""The worker's pipes: a private protocol fd, one locked writer, a bounded reader.

mlx-lm and mlx-vlm ``print()`` to stdout. ``claim_stdout`` keeps a private
duplicate of the real stdout for the protocol and points fd 1 (and
``sys.stdout``) at stderr, so library prints can never corrupt the stream.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import BinaryIO

from protocol.codec import encode
from protocol.replies import Reply

log = logging.getLogger("bridge.stdio")


def claim_stdout() -> int:
    """Return a private fd for protocol output; fd 1 becomes a copy of stderr."""
    sys.stdout.flush()
    protocol_fd = os.dup(1)
    os.set_inheritable(protocol_fd, False)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return protocol_fd


class LineWriter:
    """Writes whole protocol lines to one fd, one writer at a time.

    When the reader of the pipe is gone (EPIPE), further lines are dropped
    and ``on_broken`` runs once, so the worker can shut down.
    """

    def __init__(self, fd: int, *, on_broken: Callable[[], None] | None = None) -> None:
        self._fd = fd
        self._lock = threading.Lock()
        self._broken = False
        self._on_broken = on_broken

    @property
    def broken(self) -> bool:
        return self._broken

    def send(self, reply: Reply) -> None:
        self.write(encode(reply))

    def write(self, line: bytes) -> None:
        """Write ``line`` now, with one ``os.write`` unless the pipe is full.

        Lines are not held back to be coalesced: the engine thread is the
        only writer of tokens, so no line ever waits behind another, and a
        token must reach the host as soon as it exists.
        """
        with self._lock:
            if self._broken:
                return
            try:
                written = os.write(self._fd, line)
                if written < len(line):
                    view = memoryview(line)[written:]
                    while view:
                        view = view[os.write(self._fd, view) :]
            except OSError as exc:
                self._broken = True
                log.warning("protocol output closed (%s); shutting down", exc.strerror)
            else:
                return
        if self._on_broken is not None:
            self._on_broken()


class Oversized:
    """Stands in for a line longer than the limit (its bytes were discarded)."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


def read_lines(stream: BinaryIO, max_bytes: int) -> Iterator[bytes | Oversized]:
    """Yield non-blank lines without their newline; lines over ``max_bytes``
    are skipped to the next newline without being held in memory."""
    while True:
        line = stream.readline(max_bytes + 1)
        if not line:
            return
        if len(line) > max_bytes and not line.endswith(b"\n"):
            size = len(line)
            while True:
                rest = stream.readline(1 << 20)
                size += len(rest)
                if not rest or rest.endswith(b"\n"):
                    break
            yield Oversized(size)
            continue
        line = line.rstrip(b"\r\n")
        if line.strip():
            yield line
