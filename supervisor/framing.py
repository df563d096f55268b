"""Bytes to lines: split the worker's stdout into protocol lines, bounded.

``LineSplitter`` is fed raw chunks as they are read (any size, split
anywhere) and returns the complete lines in them, without their newline. A
line longer than the limit is never held in memory: its bytes are counted
and dropped up to the next newline, and it comes out as an ``OverlongLine``
that keeps only its first bytes, enough to read the ``type`` and ``id`` the
worker writes first.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HEAD_BYTES", "LineSplitter", "OverlongLine"]

HEAD_BYTES = 256


@dataclass(frozen=True, slots=True)
class OverlongLine:
    """Stands in for a line over the limit; ``head`` is its first bytes."""

    size: int
    head: bytes


class LineSplitter:
    __slots__ = ("_max", "_buf", "_skipped", "_head")

    def __init__(self, max_line_bytes: int) -> None:
        if max_line_bytes < 1:
            raise ValueError("max_line_bytes must be ≥ 1")
        self._max = max_line_bytes
        self._buf = b""
        self._skipped = -1  # bytes of an overlong line dropped so far; -1: not in one
        self._head = b""

    def feed(self, data: bytes) -> list[bytes | OverlongLine]:
        """The lines completed by ``data`` (empty lines included, as ``b""``)."""
        out: list[bytes | OverlongLine] = []
        if self._skipped >= 0:
            newline = data.find(b"\n")
            if newline < 0:
                self._skipped += len(data)
                return out
            out.append(OverlongLine(self._skipped + newline, self._head))
            self._skipped = -1
            self._head = b""
            data = data[newline + 1 :]
        if self._buf:
            data = self._buf + data
        lines: list[bytes | OverlongLine]
        parts = data.split(b"\n")
        rest = parts.pop()
        if len(data) > self._max:
            # Only now can a complete line be over the limit.
            lines = [
                OverlongLine(len(p), p[:HEAD_BYTES]) if len(p) > self._max else p for p in parts
            ]
        else:
            lines = parts  # type: ignore[assignment]
        if len(rest) > self._max:
            self._skipped = len(rest)
            self._head = rest[:HEAD_BYTES]
            rest = b""
        self._buf = rest
        if out:
            out.extend(lines)
            return out
        return lines

    def end(self) -> bytes | OverlongLine | None:
        """At end of input: the unterminated last line, if any."""
        if self._skipped >= 0:
            line: bytes | OverlongLine | None = OverlongLine(self._skipped, self._head)
        else:
            line = self._buf or None
        self._buf = b""
        self._skipped = -1
        return line
