"""The I/O-free pieces of a worker's life that the sync and async twins share:
``Supervision``/``AsyncSupervision`` and ``SyncChild``/``AsyncChild``.

Both supervisions run the same state machine; only their waiting differs::

    STARTING -> READY <-> RESTARTING
                  |            |
                  v            v
                 DEAD  ->   CLOSED   (close from any state)
"""

from __future__ import annotations

import enum
import logging
import os
import time
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from protocol.codec import PROTOCOL_VERSION
from protocol.errors import RequestId
from protocol.replies import HelloReply, ProgressEvent, Reply

from .core import ErrorFactory, WorkerCore
from .errors import MemoryLimitExceeded, SupervisorError, WorkerClosed, WorkerCrashed, WorkerTimeout
from .probe import ProcessProbe
from .restart import RestartGuard
from .results import StreamItem

__all__ = [
    "ProgressCallback",
    "QuitSink",
    "ReplyBox",
    "State",
    "accept_hello",
    "cancel_ignored",
    "exit_error",
    "expect",
    "fixed_error",
    "forked_error",
    "gave_up_error",
    "hello_timeout_error",
    "memory_verdict",
    "restart_refusal",
    "timed_out_error",
]

log = logging.getLogger("supervisor")

R = TypeVar("R", bound=Reply)

# The pipe readers of both children.
READ_CHUNK = 1 << 18
# After stdout closes: how long the process may take to exit before it is
# killed, and how long the stderr reader gets to deliver the last bytes.
EXIT_AFTER_EOF_S = 1.0
STDERR_SETTLE_S = 0.1
# How long closing waits for the pipe readers to end.
JOIN_TIMEOUT_S = 5.0


class State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    DEAD = "dead"
    CLOSED = "closed"


class QuitSink:
    """The ``bye`` of our own ``quit`` needs no reader: closing waits for the exit."""

    def tokens(self, batch: list[StreamItem]) -> None:
        pass

    def progress(self, event: ProgressEvent) -> None:
        pass

    def finish(self, reply: Reply) -> None:
        pass

    def fail(self, error: SupervisorError) -> None:
        pass


class _Event(Protocol):
    def set(self) -> None: ...


E = TypeVar("E", bound=_Event)


ProgressCallback = Callable[[ProgressEvent], object]
"""Called with each progress event of a request that asked for them
(``load(on_progress=...)``), on the thread or task that waits for the reply."""


class ReplyBox(Generic[E]):
    """The :class:`~supervisor.core.Sink` of a non-streaming request: keeps its
    one reply or error and sets ``event``; progress events (if the request
    asked for them) are kept and set ``event`` too, so that the waiter hands
    them to ``on_progress`` itself, never the reader of the pipe. The twins
    (``ReplySink``, ``AsyncReplySink``) add the waiting on their kind of event."""

    __slots__ = ("_event", "_reply", "_error", "_updates", "_on_progress")

    def __init__(self, event: E, on_progress: ProgressCallback | None = None) -> None:
        self._event = event
        self._reply: Reply | None = None
        self._error: SupervisorError | None = None
        self._updates: list[ProgressEvent] = []
        self._on_progress = on_progress

    def tokens(self, batch: list[StreamItem]) -> None:  # the core never sends these here
        pass

    def progress(self, event: ProgressEvent) -> None:
        if self._on_progress is not None:
            self._updates.append(event)
            self._event.set()

    @property
    def ended(self) -> bool:
        return self._reply is not None or self._error is not None

    def deliver_progress(self) -> None:
        """Hand the progress events received so far to ``on_progress``, in
        order (on the waiter's thread or task; an exception from the callback
        propagates to the caller)."""
        updates, self._updates = self._updates, []
        assert self._on_progress is not None or not updates
        for event in updates:
            self._on_progress(event)  # type: ignore[misc]

    def finish(self, reply: Reply) -> None:
        self._reply = reply
        self._event.set()

    def fail(self, error: SupervisorError) -> None:
        self._error = error
        self._event.set()

    def value(self) -> Reply:
        """The reply, once the event is set; raises the request's error."""
        if self._error is not None:
            raise self._error
        assert self._reply is not None
        return self._reply


def expect(reply: Reply, kind: type[R]) -> R:
    """Narrow a reply the core already checked against its command."""
    assert isinstance(reply, kind), reply
    return reply


def fixed_error(error: SupervisorError) -> ErrorFactory:
    def make(rid: RequestId | None) -> SupervisorError:
        return error

    return make


def gave_up_error(guard: RestartGuard, make_error: ErrorFactory) -> ErrorFactory:
    """What requests raise once the storm guard has given up."""
    message = guard.give_up_message()
    last = make_error(None)

    def make(rid: RequestId | None) -> SupervisorError:
        return WorkerCrashed(
            f"{message}; last: {last.message}",
            exit_code=getattr(last, "exit_code", None),
            stderr_tail=getattr(last, "stderr_tail", ""),
            request_id=rid,
        )

    return make


def exit_error(
    pid: int,
    returncode: int,
    *,
    closing: bool,
    kill_reason: str | None,
    kill_error: ErrorFactory | None = None,
    stderr_tail: str,
) -> ErrorFactory:
    """What the requests of a child that ended fail with: ``WorkerClosed`` if
    the host was closing it; the cause the supervisor recorded when it killed
    the child with one (``MemoryLimitExceeded``), so that every later request
    reports that cause too; else ``WorkerCrashed`` with the exit code and tail."""
    if closing:
        return lambda rid: WorkerClosed("the worker was closed", request_id=rid)
    if kill_error is not None:
        return kill_error
    if kill_reason is not None:
        message = f"worker {pid} was killed by the supervisor: {kill_reason}"
    else:
        message = f"worker {pid} died"

    def make(rid: RequestId | None) -> SupervisorError:
        return WorkerCrashed(message, exit_code=returncode, stderr_tail=stderr_tail, request_id=rid)

    return make


def forked_error(owner_pid: int) -> ErrorFactory:
    """What a forked child's copy of a worker raises: the worker is the parent's."""
    message = (
        f"this worker belongs to process {owner_pid}, not to this forked child "
        f"{os.getpid()}; start a new one here"
    )
    return lambda rid: WorkerClosed(message, request_id=rid)


def memory_verdict(probe: ProcessProbe, limit: int) -> tuple[str, ErrorFactory] | None:
    """None while the child's RSS is within ``limit`` (or it is gone); else
    the reason to kill it and the error every request fails with from then on."""
    rss = probe.rss()
    if rss is None or rss <= limit:
        return None
    message = (
        f"worker {probe.pid} uses {rss} bytes of memory, over the limit of {limit} bytes; "
        "the supervisor killed it"
    )

    def make(rid: RequestId | None) -> SupervisorError:
        return MemoryLimitExceeded(message, rss_bytes=rss, limit_bytes=limit, request_id=rid)

    return message, make


def restart_refusal(guard: RestartGuard | None, make_error: ErrorFactory) -> ErrorFactory | None:
    """None if the worker may be restarted (the restart is counted), else what
    requests raise from now on: no policy, or the storm guard has given up."""
    if guard is None:
        return make_error
    if guard.allow(time.monotonic()):
        return None
    log.error("worker: %s", guard.give_up_message())
    return gave_up_error(guard, make_error)


def hello_timeout_error(
    pid: int, stderr_tail: str, timeout: float, rid: RequestId
) -> WorkerTimeout:
    tail = stderr_tail.rstrip()[-1000:]
    return WorkerTimeout(
        f"worker {pid} did not answer hello within {timeout:g} s"
        + (f"; stderr tail:\n{tail}" if tail else ""),
        timeout=timeout,
        request_id=rid,
    )


def accept_hello(pid: int, core: WorkerCore, reply: Reply) -> HelloReply:
    """Take the worker's ``hello``: warn on another protocol version, and
    adopt its request-line limit."""
    hello = expect(reply, HelloReply)
    if hello.protocol_version != PROTOCOL_VERSION:
        log.warning(
            "worker %d speaks protocol %d; this supervisor speaks %d",
            pid,
            hello.protocol_version,
            PROTOCOL_VERSION,
        )
    limit = hello.limits.get("max_line_bytes")
    core.worker_max_line_bytes = limit if isinstance(limit, int) else None
    return hello


def timed_out_error(rid: RequestId, timeout: float) -> WorkerTimeout:
    """A request's ``timeout`` passed; it was cancelled, and ended."""
    return WorkerTimeout(
        f"request {rid}: nothing from the worker within {timeout:g} s; it was cancelled",
        timeout=timeout,
        request_id=rid,
    )


def cancel_ignored(
    rid: RequestId, grace: float, timeout: float | None
) -> tuple[WorkerTimeout, str]:
    """A request cancelled by the host (``timeout`` None) or after its
    ``timeout`` passed did not end within ``grace``: the error it ends with,
    and the reason the worker is killed."""
    if timeout is None:
        error = WorkerTimeout(
            f"request {rid} did not end within {grace:g} s of its cancel; "
            "the worker was taken for hung and killed",
            timeout=grace,
            request_id=rid,
        )
        return error, f"request {rid} did not end within {grace:g} s of its cancel"
    error = WorkerTimeout(
        f"request {rid}: nothing from the worker within {timeout:g} s, "
        f"nor within {grace:g} s of its cancel; the worker was killed",
        timeout=timeout,
        request_id=rid,
    )
    return error, f"request {rid} timed out and ignored its cancel"
