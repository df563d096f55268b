"""What can go wrong when driving a worker, as one exception tree::

    SupervisorError             base of everything this package raises
    ├── WorkerCrashed           the child died: .exit_code, .signal, .stderr_tail
    ├── WorkerTimeout           no answer in time: start-up, a request, a cancel's grace
    ├── ProtocolError           the worker broke the protocol: a non-JSON line, an
    │                           unknown id, a line over the limit, a malformed reply
    ├── RequestError            the worker answered with an error: .code, .message
    │   │                       (``__cause__`` is the matching protocol.errors class)
    │   └── InvalidArgument     a bad argument, refused before anything was sent (or
    │                           spawned): code ``invalid_request``, also a ValueError
    ├── MemoryLimitExceeded     the worker's RSS went over memory_limit_bytes
    └── WorkerClosed            the worker was closed before the request ended

Every in-flight stream ends with exactly one of these or with its result; a
request made after the worker is gone raises ``WorkerClosed`` (closed by the
host), ``WorkerCrashed`` (died, and no restart was allowed) or, when the
supervisor killed it for its memory, ``MemoryLimitExceeded``: the cause of
death is recorded before the kill, so a request that starts after the kill
decision reports it as well as the streams it cut short.
"""

from __future__ import annotations

import signal as _signal

from protocol.errors import RequestId, WireError, error_from_code

__all__ = [
    "InvalidArgument",
    "MemoryLimitExceeded",
    "ProtocolError",
    "RequestError",
    "SupervisorError",
    "WorkerClosed",
    "WorkerCrashed",
    "WorkerTimeout",
]


class SupervisorError(Exception):
    """Base class; ``request_id`` is set when the error belongs to one request."""

    def __init__(self, message: str, *, request_id: RequestId | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id


class WorkerCrashed(SupervisorError):
    """The worker process ended while requests were in flight (or could not start).

    ``exit_code`` is the process's return code (negative: killed by a
    signal, as :mod:`subprocess` reports it), ``signal`` the signal number or
    None, ``stderr_tail`` the last bytes (about 8 KiB) the worker wrote to
    stderr, decoded leniently.

    For a sharded worker (``--ranks``) whose rank r ≥ 1 died, the worker's
    ``rank_failed`` line is raised as this with ``rank`` set: then
    ``exit_code`` and ``stderr_tail`` are that rank's. ``rank`` is None for
    the worker process itself.
    """

    def __init__(
        self,
        message: str,
        *,
        exit_code: int | None,
        stderr_tail: str = "",
        request_id: RequestId | None = None,
        rank: int | None = None,
    ) -> None:
        self.rank = rank
        self.exit_code = exit_code
        self.signal = -exit_code if exit_code is not None and exit_code < 0 else None
        self.stderr_tail = stderr_tail
        super().__init__(message, request_id=request_id)

    def __str__(self) -> str:
        how = describe_exit(self.exit_code)
        text = f"{self.message} ({how})"
        if self.stderr_tail:
            tail = self.stderr_tail.rstrip()[-2000:]
            text += f"; stderr tail:\n{tail}"
        return text


class WorkerTimeout(SupervisorError):
    """No answer within a timeout; ``timeout`` is the limit in seconds."""

    def __init__(
        self, message: str, *, timeout: float, request_id: RequestId | None = None
    ) -> None:
        self.timeout = timeout
        super().__init__(message, request_id=request_id)


class ProtocolError(SupervisorError):
    """The worker wrote something the protocol does not allow.

    ``line`` holds the start (at most 200 bytes) of the offending line.
    """

    def __init__(
        self, message: str, *, line: bytes = b"", request_id: RequestId | None = None
    ) -> None:
        self.line = line[:200]
        super().__init__(message, request_id=request_id)


class RequestError(SupervisorError):
    """The worker refused or failed the request with a wire error.

    ``code`` is the stable code (``no_model``, ``invalid_request`` ...) and
    ``error`` the matching :mod:`protocol.errors` exception, also chained as
    ``__cause__``, so ``isinstance(exc.error, protocol.errors.NoModel)`` works.
    """

    def __init__(self, code: str, message: str, *, request_id: RequestId | None = None) -> None:
        self.code = code
        self.error: WireError = error_from_code(code, message, request_id=request_id)
        self.__cause__ = self.error
        super().__init__(message, request_id=request_id)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidArgument(RequestError, ValueError):
    """An argument of a ``Worker`` or ``AsyncWorker`` method (or constructor)
    that the supervisor refused before sending or spawning anything: a wrong
    type, a value out of the protocol's range (checked by the protocol's own
    request parser), a number JSON cannot carry exactly (NaN, infinity, an
    integer over 64 bits), a NUL byte in a path, an unknown option. The
    message names the argument. ``code`` is ``invalid_request``, what the
    worker would have answered, so ``except RequestError`` code that checks
    the code keeps working; it is also a ``ValueError``."""

    def __init__(self, message: str) -> None:
        super().__init__("invalid_request", message)


class MemoryLimitExceeded(SupervisorError):
    """The worker's resident memory (``rss_bytes``) went over the configured
    ``limit_bytes``, and the supervisor killed it. Raised by the requests in
    flight then, and by every request after (until a restart policy has
    brought up a new worker)."""

    def __init__(
        self,
        message: str,
        *,
        rss_bytes: int,
        limit_bytes: int,
        request_id: RequestId | None = None,
    ) -> None:
        self.rss_bytes = rss_bytes
        self.limit_bytes = limit_bytes
        super().__init__(message, request_id=request_id)


class WorkerClosed(SupervisorError):
    """The worker was closed by the host; no more requests are possible."""


def describe_exit(exit_code: int | None) -> str:
    if exit_code is None:
        return "exit status unknown"
    if exit_code < 0:
        try:
            name = _signal.Signals(-exit_code).name
        except ValueError:
            name = f"signal {-exit_code}"
        return f"killed by {name}"
    return f"exit code {exit_code}"
