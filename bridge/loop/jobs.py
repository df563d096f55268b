"""A queued request, and the promise that it ends with exactly one terminal line.

A ``Job`` is shared by the stdin thread (which may cancel it) and the engine
thread (which runs it). ``finish`` is idempotent: the first terminal line
wins, later ones are dropped, and ``emit`` after the end writes nothing.

``write``, when given, is the same output as ``send`` for lines that are
already encoded: the token fast path (:class:`bridge.loop.generation.Generation`
encodes plain token lines with :class:`protocol.codec.TokenLines`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol.codec import encode_or_error
from protocol.errors import Cancelled, WireError
from protocol.replies import Done, ErrorReply, ProgressEvent, Reply, TokenEvent
from protocol.requests import Chat, Detokenize, Generate, Info, Inspect, Load, Tokenize, Unload

log = logging.getLogger("bridge.jobs")

QueuedRequest = Load | Unload | Generate | Chat | Tokenize | Detokenize | Inspect | Info
# A sender may return False: the reply could not be encoded, and an
# ``internal`` error line for the request was written in its place (see
# ``bridge.loop.stdio.LineWriter.send``). Anything else means it was written.
Send = Callable[[Reply], object]
Write = Callable[[bytes], None]


@dataclass(eq=False, slots=True, kw_only=True)
class Job:
    request: QueuedRequest
    send: Send
    write: Write | None = None
    received_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    # Runs just before the terminal line is written, so that the id is free
    # for reuse by the time the host reads that line.
    on_finish: Callable[[Job], None] | None = None
    _cancel: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _finished: bool = False

    @property
    def is_generation(self) -> bool:
        return isinstance(self.request, Generate | Chat)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def cancel_check(self) -> Callable[[], bool]:
        """``cancelled`` as a function: one call per check in a hot loop."""
        return self._cancel.is_set

    def cancel(self) -> None:
        self._cancel.set()

    def emit(self, event: TokenEvent | ProgressEvent) -> None:
        with self._lock:
            if self._finished:
                return
            line, encoded = encode_or_error(event)
            if not encoded:
                # The internal error line that takes its place ends the
                # request: free the id first, as finish does.
                self._end_by_error()
            if self.write is None:  # no line writer (a preload): send encodes (and logs) it
                self.send(event)
                return
            if not encoded:
                log.error("%s", line.decode("utf-8", "replace").rstrip())
            self.write(line)

    def _end_by_error(self) -> None:
        self._finished = True
        self._cancel.set()
        if self.on_finish is not None:
            self.on_finish(self)

    def emit_line(self, line: bytes) -> None:
        """``emit`` of an encoded token line; only when ``write`` is set."""
        assert self.write is not None
        with self._lock:
            if not self._finished:
                self.write(line)

    def finish(self, reply: Reply) -> bool:
        """Write the terminal line; False if one was already written. A reply
        that cannot be encoded is written as an ``internal`` error line for
        the id (by ``send``): either way, exactly one terminal line."""
        with self._lock:
            if self._finished:
                return False
            self._finished = True
            if self.on_finish is not None:
                self.on_finish(self)
            self.send(reply)
            return True

    def fail(self, error: WireError) -> bool:
        return self.finish(ErrorReply.of(error, self.request.id))

    def finish_cancelled(self, reason: str = "cancelled") -> bool:
        """End a job that never ran (or was cut off): ``done`` with
        ``finish_reason: cancelled`` for generations, an error otherwise."""
        if self.is_generation:
            return self.finish(
                Done(
                    id=self.request.id,
                    finish_reason="cancelled",
                    tokens_generated=0,
                    prompt_tokens=0,
                    prompt_tps=0.0,
                    generation_tps=0.0,
                    ttft_ms=None,
                    queue_ms=(time.perf_counter() - self.received_at) * 1000.0,
                    peak_memory_bytes=0,
                )
            )
        return self.fail(Cancelled(f"{reason} before it ran"))
