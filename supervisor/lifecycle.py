"""The pieces of a worker's life that ``Supervision`` and ``AsyncSupervision`` share.

Both run the same state machine; only their waiting differs::

    STARTING -> READY <-> RESTARTING
                  |            |
                  v            v
                 DEAD  ->   CLOSED   (close from any state)
"""

from __future__ import annotations

import enum
from typing import TypeVar

from protocol.errors import RequestId
from protocol.replies import Reply

from .core import ErrorFactory
from .errors import MemoryLimitExceeded, SupervisorError, WorkerCrashed
from .restart import RestartGuard
from .results import Token

__all__ = ["QuitSink", "State", "expect", "fixed_error", "gave_up_error", "memory_error"]

R = TypeVar("R", bound=Reply)


class State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    DEAD = "dead"
    CLOSED = "closed"


class QuitSink:
    """The ``bye`` of our own ``quit`` needs no reader: closing waits for the exit."""

    def tokens(self, batch: list[Token]) -> None:
        pass

    def finish(self, reply: Reply) -> None:
        pass

    def fail(self, error: SupervisorError) -> None:
        pass


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


def memory_error(pid: int, rss: int, limit: int) -> tuple[str, ErrorFactory]:
    message = f"worker {pid} uses {rss} bytes of memory, over the limit of {limit} bytes"

    def make(rid: RequestId | None) -> SupervisorError:
        return MemoryLimitExceeded(message, rss_bytes=rss, limit_bytes=limit, request_id=rid)

    return message, make
