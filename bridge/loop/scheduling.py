"""What the router and the server need of a scheduler (:class:`Scheduler`).

:class:`bridge.loop.scheduler.BatchScheduler` is the one the worker runs;
the protocol keeps the router and the server from depending on it.
"""

from __future__ import annotations

from typing import Protocol

from bridge.loop.jobs import Job
from protocol.errors import RequestId, WireError
from protocol.replies import BatchStats


class Scheduler(Protocol):
    def start(self) -> None:
        """Start the engine thread."""

    def release_warm_up(self) -> None:
        """The host's first line has been answered: the engine may import MLX."""

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises a WireError (busy, duplicate_id, shutting_down)."""

    def cancel(self, request_id: RequestId | None, *, reason: str = "cancelled") -> None:
        """Cancel one request by id, or all; never replies."""

    def model_change_pending(self) -> bool:
        """True while a queued or running load/unload may change the model."""
        ...

    def stats(self) -> BatchStats:
        """The batch's figures, for ``info`` (any thread)."""
        ...

    def fail_all(self, error: WireError) -> None:
        """End every queued and running request with ``error`` (any thread);
        for a worker that is about to exit without its engine thread."""

    def shutdown(self, timeout: float) -> bool:
        """Cancel everything and stop; True if the engine thread ended in time."""
        ...
