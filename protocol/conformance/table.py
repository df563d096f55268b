"""The shape of the kit's table: cases, and the groups that share one worker.

A *case* is a function that drives a :class:`~.session.Session` and raises
:class:`~.session.CaseFailed` (or :class:`~.session.CaseSkipped`); it may
return a short note for the report. A *group* is a list of cases run in
order on one worker process, after a setup (``hello``, then ``load`` if the
group needs the model); a group marked ``same_worker`` goes on with the
previous group's worker when it is still running (each spawn of a real
worker costs seconds of MLX import). Each case starts from that state and leaves it (or
ends the worker: then it is the group's last case). When a case fails, its
worker is killed and the next case gets a fresh one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .session import Session

__all__ = ["Case", "CaseFn", "Group"]

CaseFn = Callable[[Session], "str | None"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Case:
    name: str
    run: CaseFn
    ends_worker: bool = False
    """The case quits the worker or closes its stdin, and checks how it exits."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Group:
    name: str
    about: str
    model: bool
    """Setup loads the model (``--model``, or the built fixture model)."""
    cases: tuple[Case, ...]
    same_worker: bool = False
    """Go on with the previous group's worker if it is still running."""
