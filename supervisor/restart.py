"""When to bring a crashed worker back: a restart policy with a storm guard.

Off by default. With ``RestartPolicy(max_restarts=N, window_s=T)`` a worker
that dies unexpectedly is respawned (and its last model reloaded) unless it
has already been restarted N times within the last T seconds; then the
supervisor gives up, as Erlang/OTP supervisors (``intensity``/``period``)
and jupyter_client's restarter do. ``RestartGuard`` is the I/O-free counter.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from . import arguments

__all__ = ["RestartGuard", "RestartPolicy"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RestartPolicy:
    max_restarts: int = 3
    window_s: float = 60.0

    def __post_init__(self) -> None:
        """Bad values raise :class:`~supervisor.errors.InvalidArgument` (a ValueError)."""
        arguments.whole("max_restarts", self.max_restarts, minimum=0)
        arguments.seconds("window_s", self.window_s, none_ok=False, positive=True)


class RestartGuard:
    """Counts restarts in a sliding window; times come from the caller's clock."""

    __slots__ = ("policy", "_times")

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self._times: deque[float] = deque()

    def allow(self, now: float) -> bool:
        """True (and counted) if one more restart fits in the window."""
        while self._times and self._times[0] <= now - self.policy.window_s:
            self._times.popleft()
        if len(self._times) >= self.policy.max_restarts:
            return False
        self._times.append(now)
        return True

    def give_up_message(self) -> str:
        p = self.policy
        return f"gave up restarting: {p.max_restarts} restart(s) within {p.window_s:g} s"
