"""The I/O-free core of ``WorkerPool`` and ``AsyncWorkerPool``: shape, placement, stats.

Both twins check their arguments with :func:`member_count` and
:func:`member_envs`, place each request with one :class:`Placement`, and
report :class:`PoolStats`; only the I/O (threads or asyncio) differs.

Placement, for each ``generate`` or ``chat``:

1. a request with a ``cache_key`` goes to the member that served that key
   last (its prompt cache holds the conversation), if that member is still
   usable (not closed, not dead after its restarts ran out). The key is
   remembered in a bounded LRU map (:data:`AFFINITY_KEYS` keys); the oldest
   key is forgotten first;
2. any other request (and one whose member is gone) goes to the least
   loaded usable member: the fewest outstanding requests, then the fewest
   tokens in flight, then the lowest index.

A member being restarted stays usable: its requests wait for the restart,
as a single ``Worker``'s do. Its prompt cache is gone, but its affinities
are kept (the conversation's next turn rebuilds the cache there).

"Tokens in flight" is an estimate, :func:`estimate_tokens`: a quarter of
the prompt's characters (about one token per four characters of English)
plus ``max_tokens``. It only breaks ties between members with as many
requests, so it need not be exact.

A placed request holds a :class:`Lease` on its member until its stream ends,
however it ends (the stream's ``on_end`` hook releases it).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TypedDict

from protocol.requests import DEFAULT_MAX_TOKENS

from .errors import InvalidArgument
from .restart import RestartPolicy
from .results import WorkerStats

__all__ = [
    "AFFINITY_KEYS",
    "DEVICE_ENV",
    "MAX_MEMBERS",
    "Lease",
    "MemberStats",
    "Placement",
    "PoolStats",
    "WorkerOptions",
    "estimate_tokens",
    "member_count",
    "member_envs",
    "worker_options",
]

AFFINITY_KEYS = 4096
"""How many ``cache_key`` s a pool remembers (least recently used go first)."""
MAX_MEMBERS = 1024
"""The most members a pool may have."""
DEVICE_ENV = "CUDA_VISIBLE_DEVICES"
"""The variable that gives each member of ``devices=`` its device."""


class WorkerOptions(TypedDict, total=False):
    """The ``Worker`` / ``AsyncWorker`` keyword arguments a pool passes to
    every member (``model`` and ``env`` are the pool's own arguments)."""

    inherit_env: bool
    cwd: str | os.PathLike[str] | None
    start_timeout: float
    request_timeout: float | None
    cancel_grace: float
    quit_timeout: float
    term_timeout: float
    kill_timeout: float
    restart: RestartPolicy | None
    memory_limit_bytes: int | None
    memory_poll_interval: float
    max_line_bytes: int
    model_root: str | os.PathLike[str] | None
    image_roots: Sequence[str | os.PathLike[str]] | None
    trust_remote_code: bool


_OPTIONS = frozenset(WorkerOptions.__annotations__)


def worker_options(options: Mapping[str, object]) -> dict[str, object]:
    """The member keyword arguments, refusing a name a worker does not take
    (the values are checked by each ``Worker``'s own ``Settings``)."""
    for name in options:
        if name not in _OPTIONS:
            raise InvalidArgument(f"{name}: not an option of a pool's workers")
    return dict(options)


def _kind(value: object) -> str:
    return type(value).__name__


def _device(i: int, value: object) -> str:
    name = f"devices[{i}]"
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidArgument(f"{name}: must be a device id (int or str), got {_kind(value)}")
    if isinstance(value, int):
        if not 0 <= value < 2**31:
            raise InvalidArgument(f"{name}: must be ≥ 0 and below 2**31, got {value}")
        return str(value)
    if not value or value != value.strip():
        raise InvalidArgument(f"{name}: must be a non-empty id without surrounding spaces")
    if "\0" in value or not value.isprintable():
        raise InvalidArgument(f"{name}: must not contain a NUL byte or control characters")
    return value


def member_count(members: object, devices: object) -> tuple[int, tuple[str, ...] | None]:
    """The number of members and the device ids (as strings), checked.

    ``devices`` alone: one member per device. ``members`` alone: that many,
    on whatever device the environment gives (several on one device).
    Both: ``members`` members, member ``i`` on ``devices[i % len(devices)]``.
    """
    ids: tuple[str, ...] | None = None
    if devices is not None:
        if isinstance(devices, str | bytes) or not isinstance(devices, Sequence):
            raise InvalidArgument(f"devices: must be a list of device ids, got {_kind(devices)}")
        if not devices:
            raise InvalidArgument("devices: must name at least one device")
        if len(devices) > MAX_MEMBERS:
            raise InvalidArgument(f"devices: at most {MAX_MEMBERS}, got {len(devices)}")
        ids = tuple(_device(i, d) for i, d in enumerate(devices))
    if members is None:
        if ids is None:
            raise InvalidArgument("members: give members=N or devices=[...]")
        return len(ids), ids
    if isinstance(members, bool) or not isinstance(members, int):
        raise InvalidArgument(f"members: must be an integer, got {_kind(members)}")
    if not 1 <= members <= MAX_MEMBERS:
        raise InvalidArgument(f"members: must be from 1 to {MAX_MEMBERS}, got {members}")
    return members, ids


def member_envs(
    count: int, devices: tuple[str, ...] | None, env: object
) -> list[Mapping[str, str] | None]:
    """Each member's ``env`` argument: ``env``, plus ``CUDA_VISIBLE_DEVICES``
    with ``devices``. An ``env`` that sets that variable too is refused."""
    if env is not None and not isinstance(env, Mapping):
        raise InvalidArgument(f"env: must be a mapping of strings, got {_kind(env)}")
    if devices is None:
        return [dict(env) if env is not None else None for _ in range(count)]
    if env is not None and DEVICE_ENV in env:
        raise InvalidArgument(f"env: sets {DEVICE_ENV}, which devices= gives each member")
    base = dict(env or {})
    return [base | {DEVICE_ENV: devices[i % len(devices)]} for i in range(count)]


def estimate_tokens(prompt_chars: int, max_tokens: object) -> int:
    """Tokens a request may hold: ``prompt_chars // 4 + max_tokens`` (the
    worker's default when ``max_tokens`` is absent or not a positive int)."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        max_tokens = DEFAULT_MAX_TOKENS
    return max(prompt_chars, 0) // 4 + max_tokens


def text_chars(value: object, depth: int = 0) -> int:
    """The characters of every string in a prompt or a list of messages
    (their text parts, role names and all; a rough measure is enough)."""
    if isinstance(value, str):
        return len(value)
    if depth > 16:
        return 0
    if isinstance(value, Mapping):
        return sum(text_chars(v, depth + 1) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(text_chars(v, depth + 1) for v in value)
    return 0


class Lease:
    """A request placed on a member, until :meth:`release` (idempotent)."""

    __slots__ = ("member", "tokens", "_placement", "_released")

    def __init__(self, placement: Placement, member: int, tokens: int) -> None:
        self.member = member
        self.tokens = tokens
        self._placement = placement
        self._released = False

    def release(self) -> None:
        self._placement._release(self)


class Placement:
    """Which member gets each request; counts what each one has in flight.

    Thread-safe (one lock, never held while calling out), so the sync pool
    may place from any thread and release from the members' stdout threads.
    """

    def __init__(self, members: int, *, affinity_keys: int = AFFINITY_KEYS) -> None:
        if isinstance(members, bool) or not isinstance(members, int) or members < 1:
            raise InvalidArgument(f"members: must be an integer ≥ 1, got {members!r}")
        if isinstance(affinity_keys, bool) or not isinstance(affinity_keys, int):
            raise InvalidArgument("affinity_keys: must be an integer")
        if affinity_keys < 0:
            raise InvalidArgument(f"affinity_keys: must be ≥ 0, got {affinity_keys}")
        self.members = members
        self.affinity_keys = affinity_keys
        self._lock = threading.Lock()
        self._outstanding = [0] * members
        self._tokens = [0] * members
        self._affinity: OrderedDict[str, int] = OrderedDict()

    def place(
        self, cache_key: str | None, tokens: int, usable: Collection[int] | None = None
    ) -> Lease:
        """Choose a member for a request and count it there. ``usable`` are
        the members that may take it (None: all); if none may, all are
        considered, so that the chosen member raises its own error."""
        with self._lock:
            member = self._choose(cache_key, usable)
            self._outstanding[member] += 1
            self._tokens[member] += tokens
            if cache_key is not None and self.affinity_keys:
                self._affinity[cache_key] = member
                self._affinity.move_to_end(cache_key)
                while len(self._affinity) > self.affinity_keys:
                    self._affinity.popitem(last=False)
            return Lease(self, member, tokens)

    def least_loaded(self, usable: Collection[int] | None = None) -> int:
        """The member a request without affinity would get (nothing counted)."""
        with self._lock:
            return self._choose(None, usable)

    def _choose(self, cache_key: str | None, usable: Collection[int] | None) -> int:
        candidates = [i for i in range(self.members) if usable is None or i in usable] or list(
            range(self.members)
        )
        if cache_key is not None:
            member = self._affinity.get(cache_key)
            if member is not None and member in candidates:
                return member
        return min(candidates, key=lambda i: (self._outstanding[i], self._tokens[i], i))

    def _release(self, lease: Lease) -> None:
        with self._lock:
            if lease._released:
                return
            lease._released = True
            self._outstanding[lease.member] -= 1
            self._tokens[lease.member] -= lease.tokens

    def affinity(self, cache_key: str) -> int | None:
        """The member that served ``cache_key`` last, if it is remembered."""
        with self._lock:
            return self._affinity.get(cache_key)

    def outstanding(self, member: int) -> int:
        with self._lock:
            return self._outstanding[member]

    def tokens_in_flight(self, member: int) -> int:
        with self._lock:
            return self._tokens[member]


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberStats:
    """One member of a pool: its place, its load, and its process.

    ``worker`` is its ``WorkerStats``; None (with ``error``, the message)
    when it could not be read, for example from a member that is dead.
    """

    index: int
    device: str | None
    outstanding: int
    tokens_in_flight: int
    restarts: int
    alive: bool
    worker: WorkerStats | None
    error: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolStats:
    """Every member's :class:`MemberStats`, and the pool's totals (over the
    members whose stats could be read, for ``rss_bytes`` and ``cpu_percent``)."""

    members: tuple[MemberStats, ...]
    alive: int
    outstanding: int
    tokens_in_flight: int
    restarts: int
    rss_bytes: int
    cpu_percent: float

    @classmethod
    def of(cls, members: Sequence[MemberStats]) -> PoolStats:
        read = [m.worker for m in members if m.worker is not None]
        return cls(
            members=tuple(members),
            alive=sum(m.alive for m in members),
            outstanding=sum(m.outstanding for m in members),
            tokens_in_flight=sum(m.tokens_in_flight for m in members),
            restarts=sum(m.restarts for m in members),
            rss_bytes=sum(w.rss_bytes for w in read),
            cpu_percent=sum(w.cpu_percent for w in read),
        )
