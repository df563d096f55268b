"""Stop strings over a token stream, without ever emitting the stop string.

``StopFilter`` is I/O-free. Push each token with its text; it returns the
tokens that are now safe to emit, holding back tokens whose text could be the
start of a stop string. When a stop string completes (even across tokens),
the token that contains its start is truncated right before it and
everything after is dropped. ``flush`` releases what is held at the end.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class StopFilter(Generic[T]):
    __slots__ = ("_stops", "_pending", "_pending_text", "stopped")

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._pending: list[tuple[T, str]] = []
        self._pending_text = ""
        self.stopped = False

    @property
    def active(self) -> bool:
        """False when there are no stop strings: ``push`` passes every token through."""
        return bool(self._stops)

    def push(self, item: T, text: str) -> list[tuple[T, str]]:
        if self.stopped:
            return []
        if not self._stops:
            return [(item, text)]
        self._pending.append((item, text))
        self._pending_text += text
        cut = self._first_match()
        if cut is not None:
            self.stopped = True
            return self._release(cut, truncate=True)
        return self._release(len(self._pending_text) - self._held_suffix(), truncate=False)

    def flush(self) -> list[tuple[T, str]]:
        out, self._pending, self._pending_text = self._pending, [], ""
        return out

    def _first_match(self) -> int | None:
        hits = [i for i in (self._pending_text.find(s) for s in self._stops) if i >= 0]
        return min(hits) if hits else None

    def _held_suffix(self) -> int:
        """Length of the longest suffix of the pending text that begins a stop string."""
        text = self._pending_text
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best

    def _release(self, limit: int, *, truncate: bool) -> list[tuple[T, str]]:
        """Emit pending tokens whose text lies within ``[0, limit)``; with
        ``truncate`` the token straddling ``limit`` is cut, the rest dropped."""
        out: list[tuple[T, str]] = []
        pos = 0
        keep = 0
        for item, text in self._pending:
            end = pos + len(text)
            if end <= limit:
                out.append((item, text))
                keep += 1
            elif truncate and pos < limit:
                out.append((item, text[: limit - pos]))
                keep += 1
            else:
                break
            pos = end
        if truncate:
            self._pending, self._pending_text = [], ""
        else:
            self._pending = self._pending[keep:]
            self._pending_text = self._pending_text[pos if keep else 0 :]
        return out
