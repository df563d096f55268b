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

from protocol.codec import encode_or_error
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

    def send(self, reply: Reply) -> bool:
        """Write ``reply``; False when it could not be encoded and an
        ``internal`` error line for its id was written instead (that line
        is terminal: the request has ended)."""
        line, encoded = encode_or_error(reply)
        if not encoded:
            log.error("%s", line.decode("utf-8", "replace").rstrip())
        self.write(line)
        return encoded

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


# Reads are at most this long, so an overlong line is never held whole.
READ_CHUNK = 1 << 20


def read_lines(stream: BinaryIO, max_bytes: int) -> Iterator[bytes | Oversized]:
    """Yield non-blank lines without their line ending (``\n`` or ``\r\n``).

    ``max_bytes`` bounds a line without its ending. A longer line is read
    on to its end in chunks of at most ``READ_CHUNK`` bytes and dropped as it
    goes (at most ``max_bytes`` + 2 + one chunk of it is ever held), and an
    :class:`Oversized` with its length, ending excluded, stands in for it.
    """
    chunk = min(READ_CHUNK, max_bytes + 2)
    while True:
        piece = stream.readline(chunk)
        if not piece:
            return
        if piece.endswith(b"\n"):  # the common case: the whole line in one read
            line: bytes | Oversized = _without_ending(piece, len(piece), piece, max_bytes)
        else:
            line = _rest_of_line(stream, piece, chunk, max_bytes)
        if isinstance(line, Oversized) or line.strip():
            yield line


def _rest_of_line(stream: BinaryIO, first: bytes, chunk: int, max_bytes: int) -> bytes | Oversized:
    held: list[bytes] | None = [first]  # pieces, joined once: no growing buffer to copy
    size = len(first)
    tail = first[-2:]
    while not tail.endswith(b"\n"):
        piece = stream.readline(chunk)
        if not piece:  # end of input: the last line had no newline
            break
        size += len(piece)
        tail = (tail + piece)[-2:]
        if held is not None:
            held.append(piece)
            if size > max_bytes + 2:  # over the limit whatever its ending: drop it
                held = None
    return _without_ending(b"".join(held or ()), size, tail, max_bytes)


def _without_ending(line: bytes, size: int, tail: bytes, max_bytes: int) -> bytes | Oversized:
    """``line`` (``size`` bytes read, ending with ``tail``) without its
    ``\n`` or ``\r\n``, or an ``Oversized`` when the rest is over ``max_bytes``."""
    ending = 2 if tail.endswith(b"\r\n") else 1 if tail.endswith(b"\n") else 0
    if size - ending > max_bytes:
        return Oversized(size - ending)
    return line[: len(line) - ending]
