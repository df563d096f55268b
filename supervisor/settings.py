"""How a worker is launched and supervised: one frozen record for both twins."""

from __future__ import annotations

import enum
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from protocol.codec import DEFAULT_MAX_LINE_BYTES

from .restart import RestartPolicy
from .stderr import TAIL_BYTES

__all__ = [
    "USE_DEFAULT",
    "Settings",
    "Timeout",
    "UseDefault",
    "command_of",
    "optional_path",
    "default_command",
    "module_command",
]


class UseDefault(enum.Enum):
    """A timeout argument left out: use the worker's ``request_timeout``."""

    USE_DEFAULT = "use the worker's request_timeout"


USE_DEFAULT = UseDefault.USE_DEFAULT
Timeout = float | None | UseDefault
"""Seconds, None for no limit, or USE_DEFAULT."""


# Python 3.10 has no -P: this does what it does, for one module run as
# ``python -c CODE MODULE ARGS...``. With -c, sys.path[0] is '' (the working
# directory) until the code removes it; nothing of ours is imported before.
_RUN_MODULE_SAFELY = (
    "import sys; del sys.path[0]; import runpy; "
    "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)"
)


def module_command(module: str) -> tuple[str, ...]:
    """``python -m MODULE`` with this interpreter, safe from the working directory.

    Plain ``python -m bridge`` puts the working directory first on the import
    path, so a ``bridge.py``, ``protocol.py`` or ``orjson.py`` there would run
    instead of ours. ``-P`` (Python 3.11+) leaves it out; on 3.10 the module
    is run through ``runpy`` after dropping it. ``PYTHONPATH`` still counts.
    """
    if sys.version_info >= (3, 11):
        return (sys.executable, "-P", "-m", module)
    return (sys.executable, "-c", _RUN_MODULE_SAFELY, module)


def default_command() -> tuple[str, ...]:
    return module_command("bridge")


def command_of(command: Sequence[str] | None) -> tuple[str, ...]:
    if isinstance(command, str | bytes):
        raise TypeError("command is an argv list, not a string")
    return tuple(command) if command is not None else default_command()


def optional_path(path: str | os.PathLike[str] | None) -> str | None:
    return os.fspath(path) if path is not None else None


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Every knob of a worker; the ``Worker`` and ``AsyncWorker`` arguments.

    Timeouts are in seconds. ``request_timeout`` (None: no limit) is the
    longest wait for the *next* line of a request: the reply, the first token,
    or the next token. ``cancel_grace`` is how long a cancelled (or timed-out)
    request may take to end before the worker is taken for hung and killed.
    The close ladder waits ``quit_timeout`` after ``quit``, ``term_timeout``
    after SIGTERM and ``kill_timeout`` after SIGKILL.
    """

    command: tuple[str, ...]
    env: Mapping[str, str] | None = None
    inherit_env: bool = True
    cwd: str | None = None
    start_timeout: float = 30.0
    request_timeout: float | None = None
    cancel_grace: float = 2.0
    quit_timeout: float = 2.0
    term_timeout: float = 2.0
    kill_timeout: float = 5.0
    restart: RestartPolicy | None = None
    memory_limit_bytes: int | None = None
    memory_poll_interval: float = 0.5
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    stderr_tail_bytes: int = TAIL_BYTES

    def __post_init__(self) -> None:
        if not self.command:
            raise ValueError("command must not be empty")
        for name in ("start_timeout", "cancel_grace", "quit_timeout", "term_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0")
        if self.memory_poll_interval <= 0:
            raise ValueError("memory_poll_interval must be > 0")

    def timeout(self, value: Timeout) -> float | None:
        if isinstance(value, UseDefault):
            return self.request_timeout
        return value

    def child_env(self) -> dict[str, str] | None:
        """The child's environment: ours plus ``env`` (or ``env`` alone).
        Secrets belong here, never in ``command``."""
        if self.inherit_env:
            if self.env is None:
                return None
            return {**os.environ, **self.env}
        return dict(self.env or {})
