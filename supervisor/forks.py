"""A forked child of the host lets go of every worker's pipes.

A worker exits when its stdin reaches end of file, which is how it outlives
no host, even one killed with SIGKILL. But a host that forks (``os.fork``,
``multiprocessing`` with the ``fork`` start method) gives the child a copy of
every pipe it holds, and while a child holds the write end of a worker's
stdin, the worker never sees end of file: it outlives the host that started
it, for as long as the child lives. A child that holds the read ends can
also block a worker writing into a full pipe.

So each live worker process is tracked here (weakly), and right after a
fork, in the child, :func:`os.register_at_fork` closes the child's copies of
their pipes (``forget_after_fork``). The child's copies of ``Worker`` and
``AsyncWorker`` objects then belong to another process: the supervisions
check the pid they were made in, so in the child they send nothing, signal
nothing, close nothing, and raise ``WorkerClosed``.

``PR_SET_PDEATHSIG`` is not used instead: it could only be set through
``preexec_fn``, which is unsafe in a host that runs threads, and it fires
when the *thread* that spawned the worker ends, not the process, which would
kill a worker started from a short-lived thread.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Protocol

__all__ = ["PipeHolder", "track"]

log = logging.getLogger("supervisor")


class PipeHolder(Protocol):
    def forget_after_fork(self) -> None:
        """In a forked child: close this process's copies of the pipes, and
        never write to, signal or wait for the worker (the parent's)."""


_live: weakref.WeakSet[PipeHolder] = weakref.WeakSet()


def track(holder: PipeHolder) -> None:
    """Close ``holder``'s pipes in every child forked while it lives."""
    _live.add(holder)


def _after_fork_in_child() -> None:
    holders = list(_live)
    _live.clear()
    for holder in holders:
        try:
            holder.forget_after_fork()
        except Exception:  # never break the child's fork over this
            log.exception("supervisor: closing a worker's pipes after fork failed")


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
