"""How a worker is launched and supervised: one frozen record for both twins."""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from protocol.codec import DEFAULT_MAX_LINE_BYTES
from protocol.launch import module_command

from . import arguments
from .errors import InvalidArgument
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
    "roots_of",
    "worker_command",
    "module_command",
]


class UseDefault(enum.Enum):
    """A timeout argument left out: use the worker's ``request_timeout``."""

    USE_DEFAULT = "use the worker's request_timeout"


USE_DEFAULT = UseDefault.USE_DEFAULT
Timeout = float | None | UseDefault
"""Seconds, None for no limit, or USE_DEFAULT."""


def default_command() -> tuple[str, ...]:
    return module_command("bridge")


def command_of(command: Sequence[str] | None) -> tuple[str, ...]:
    if isinstance(command, str | bytes):
        raise TypeError("command is an argv list, not a string")
    return tuple(command) if command is not None else default_command()


def optional_path(path: str | os.PathLike[str] | None, name: str = "path") -> str | None:
    return arguments.path(name, path) if path is not None else None


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Every knob of a worker; the ``Worker`` and ``AsyncWorker`` arguments.

    Timeouts are in seconds. ``request_timeout`` (None: no limit) is the
    longest wait for the *next* line of a request: the reply, the first token,
    or the next token. ``cancel_grace`` is how long a cancelled (or timed-out)
    request may take to end before the worker is taken for hung and killed.
    The close ladder waits ``quit_timeout`` after ``quit``, ``term_timeout``
    after SIGTERM and ``kill_timeout`` after SIGKILL.

    Three settings stand for the worker's own safety flags (docs/security.md)
    and are appended to ``command`` (see :attr:`argv`), so the worker must
    know them (``python -m bridge`` and ``python -m mock_worker`` do):

    - ``model_root``: ``--model-root=DIR``: ``load`` may only open model
      directories under DIR (others fail with ``forbidden``);
    - ``image_roots``: ``--image-root=DIR`` for each: local image paths must
      lie under one of them. A host that forwards end users' chat messages
      should set it (to a directory holding only what users may show the
      model), so that a message cannot name the host's files;
    - ``trust_remote_code``: ``--trust-remote-code``: a model directory's
      own Python code may run, for a ``load`` that also asks for it
      (``Worker.load(..., trust_remote_code=True)``). Off by default.

    Every value is checked here: a bad one raises
    :class:`~supervisor.errors.InvalidArgument` before anything is spawned.
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
    model_root: str | None = None
    image_roots: tuple[str, ...] = ()
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.command, tuple) or not self.command:
            raise InvalidArgument("command: must be a non-empty argv tuple")
        for i, item in enumerate(self.command):
            _argv_item(f"command[{i}]", item)
        if self.env is not None:
            _check_env(self.env)
        for name in ("inherit_env", "trust_remote_code"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgument(f"{name}: must be True or False")
        if self.cwd is not None:
            arguments.path("cwd", self.cwd)
        for name in ("start_timeout", "cancel_grace", "quit_timeout", "term_timeout"):
            arguments.seconds(name, getattr(self, name), none_ok=False)
        arguments.seconds("kill_timeout", self.kill_timeout, none_ok=False)
        arguments.seconds("request_timeout", self.request_timeout, none_ok=True)
        arguments.seconds(
            "memory_poll_interval", self.memory_poll_interval, none_ok=False, positive=True
        )
        if self.restart is not None and not isinstance(self.restart, RestartPolicy):
            raise InvalidArgument("restart: must be a RestartPolicy or None")
        arguments.whole("memory_limit_bytes", self.memory_limit_bytes, minimum=1, none_ok=True)
        arguments.whole("max_line_bytes", self.max_line_bytes, minimum=1)
        arguments.whole("stderr_tail_bytes", self.stderr_tail_bytes, minimum=0)
        if self.model_root is not None:
            arguments.path("model_root", self.model_root)
        if not isinstance(self.image_roots, tuple):
            raise InvalidArgument("image_roots: must be a tuple of paths")
        for i, root in enumerate(self.image_roots):
            arguments.path(f"image_roots[{i}]", root)

    @property
    def argv(self) -> tuple[str, ...]:
        """What the worker is started with: ``command``, then the flags of
        ``model_root``, ``image_roots`` and ``trust_remote_code``. Each
        flag is one ``--flag=VALUE`` word, so a value may start with ``-``."""
        flags: list[str] = []
        if self.model_root is not None:
            flags.append(f"--model-root={self.model_root}")
        flags.extend(f"--image-root={root}" for root in self.image_roots)
        if self.trust_remote_code:
            flags.append("--trust-remote-code")
        return (*self.command, *flags)

    def timeout(self, value: Timeout) -> float | None:
        """A method's ``timeout`` argument, checked: USE_DEFAULT, None or seconds."""
        if isinstance(value, UseDefault):
            return self.request_timeout
        return arguments.seconds("timeout", value, none_ok=True)

    def child_env(self) -> dict[str, str] | None:
        """The child's environment: ours plus ``env`` (or ``env`` alone).
        Secrets belong here, never in ``command``."""
        if self.inherit_env:
            if self.env is None:
                return None
            return {**os.environ, **self.env}
        return dict(self.env or {})


def _argv_item(name: str, item: object) -> str:
    if not isinstance(item, str):
        raise InvalidArgument(f"{name}: must be a string, got {type(item).__name__}")
    if "\0" in item:
        raise InvalidArgument(f"{name}: must not contain a NUL byte")
    return item


def _check_env(env: object) -> None:
    if not isinstance(env, Mapping):
        raise InvalidArgument(f"env: must be a mapping of strings, got {type(env).__name__}")
    for key, value in env.items():
        if not isinstance(key, str) or not key or "=" in key or "\0" in key:
            raise InvalidArgument(f"env: {key!r} is not a variable name")
        if not isinstance(value, str) or "\0" in value:
            raise InvalidArgument(f"env[{key!r}]: must be a string without NUL bytes")


def worker_command(command: object) -> tuple[str, ...]:
    """The ``command`` argument of ``Worker``/``AsyncWorker`` as an argv
    tuple (None: :func:`default_command`); paths (``os.PathLike``) become
    strings. Anything else raises :class:`~supervisor.errors.InvalidArgument`."""
    if command is None:
        return command_of(None)
    if isinstance(command, str | bytes):
        raise InvalidArgument("command: an argv list, not a string")
    try:
        items = list(command)  # type: ignore[call-overload]
    except TypeError:
        raise InvalidArgument(
            f"command: must be an argv list, got {type(command).__name__}"
        ) from None
    argv = [os.fspath(item) if isinstance(item, os.PathLike) else item for item in items]
    return command_of([_argv_item(f"command[{i}]", item) for i, item in enumerate(argv)])


def roots_of(roots: object) -> tuple[str, ...]:
    """The ``image_roots`` argument: one path or an iterable of them."""
    if roots is None:
        return ()
    if isinstance(roots, str | os.PathLike):
        roots = [roots]
    try:
        items = list(roots)  # type: ignore[call-overload]
    except TypeError:
        raise InvalidArgument(
            f"image_roots: must be a list of paths, got {type(roots).__name__}"
        ) from None
    return tuple(arguments.path(f"image_roots[{i}]", root) for i, root in enumerate(items))
