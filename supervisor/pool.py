"""``WorkerPool``: several workers behind the stream API of one ``Worker``.

Placement, stats and the checks of the pool's own arguments live in the
I/O-free :mod:`supervisor.placement`, shared with ``AsyncWorkerPool``; this
module only runs the members on threads.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from protocol.replies import InfoReply, Loaded, ProgressEvent

from . import commands
from .errors import InvalidArgument, SupervisorError
from .placement import (
    Lease,
    MemberStats,
    Placement,
    PoolStats,
    WorkerOptions,
    estimate_tokens,
    member_count,
    member_envs,
    text_chars,
    worker_options,
)
from .results import Token
from .settings import USE_DEFAULT, Timeout
from .stream import Stream
from .worker import Worker

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["WorkerPool"]

R = TypeVar("R")
_THREADS = 32  # at most this many members are started, loaded or closed at once


def _on_all(workers: Sequence[Worker], call: Callable[[Worker], R]) -> list[R]:
    """``call`` on every member concurrently; raises the first error (by
    member index) once every call has ended."""
    return _on_all_indices(len(workers), lambda i: call(workers[i]))


def _on_all_indices(count: int, call: Callable[[int], R]) -> list[R]:
    if count <= 1:
        return [call(0)] if count else []
    with ThreadPoolExecutor(min(count, _THREADS), "supervisor-pool") as ex:
        futures = [ex.submit(call, i) for i in range(count)]
    return [f.result() for f in futures]


class WorkerPool:
    """N worker processes, each a :class:`~supervisor.worker.Worker`, behind one API.

    ::

        with WorkerPool(devices=[0, 1], model="path/to/model") as pool:
            with pool.chat(messages, cache_key="conversation-7", max_tokens=64) as stream:
                for token in stream:
                    ...

    ``devices`` (CUDA device ids) gives one member per device, member ``i``
    started with ``CUDA_VISIBLE_DEVICES=devices[i]``; ``members=N`` starts N
    on the device the environment gives (several on one device); with both,
    member ``i`` is on ``devices[i % len(devices)]``. Every other argument
    is ``Worker``'s, the same for every member: ``command``, ``model``
    (loaded on each before the constructor returns), ``env``, ``restart``
    (each member restarts under its own policy), the timeouts of the close
    ladder, and so on. Members start concurrently; if one fails to start,
    the others are closed and its error is raised.

    ``generate`` and ``chat`` return the chosen member's own ``Stream``
    (cancel it, read its ``result``, as with one worker); see
    :mod:`supervisor.placement` for how the member is chosen. A member that
    dies fails its own streams with ``WorkerCrashed`` and restarts under its
    policy; the others' streams go on. Every method may be called from any
    thread.
    """

    def __init__(
        self,
        command: Sequence[str] | None = None,
        *,
        members: int | None = None,
        devices: Sequence[int | str] | None = None,
        model: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        **options: Unpack[WorkerOptions],
    ) -> None:
        count, self.devices = member_count(members, devices)
        envs = member_envs(count, self.devices, env)
        kwargs: dict[str, Any] = worker_options(options)
        self._placement = Placement(count)
        started: list[Worker | None] = [None] * count

        def start(i: int) -> None:
            started[i] = Worker(command, model=model, env=envs[i], **kwargs)

        try:
            _on_all_indices(count, start)
        except BaseException:
            _on_all([w for w in started if w is not None], Worker.close)
            raise
        self._members: tuple[Worker, ...] = tuple(w for w in started if w is not None)
        self._closed = False

    # -- state ------------------------------------------------------------------------

    @property
    def members(self) -> tuple[Worker, ...]:
        """The members, in index order."""
        return self._members

    def __len__(self) -> int:
        return len(self._members)

    @property
    def pids(self) -> tuple[int, ...]:
        """Each member's current pid (a restart changes it)."""
        return tuple(w.pid for w in self._members)

    @property
    def placement(self) -> Placement:
        """The placement core: affinities and what each member has in flight."""
        return self._placement

    def _usable(self) -> set[int]:
        return {i for i, w in enumerate(self._members) if w.alive}

    def _place(self, cache_key: object, tokens: int) -> Lease:
        if self._closed:
            # Let a member raise WorkerClosed, as a closed Worker does.
            return self._placement.place(None, tokens)
        key = cache_key if isinstance(cache_key, str) else None
        return self._placement.place(key, tokens, self._usable())

    @staticmethod
    def _leased(lease: Lease, make: Callable[[], Stream[Any]]) -> Stream[Any]:
        try:
            stream = make()
        except BaseException:
            lease.release()
            raise
        stream.on_end(lease.release)
        return stream

    # -- requests -----------------------------------------------------------------------

    @overload
    def generate(
        self,
        prompt: str,
        *,
        cache_key: str | None = ...,
        progress: Literal[False] = False,
        timeout: Timeout = ...,
        extra: commands.Extra | None = ...,
        **sampling: Unpack[commands.SamplingOptions],
    ) -> Stream[Token]: ...

    @overload
    def generate(
        self,
        prompt: str,
        *,
        cache_key: str | None = ...,
        progress: bool,
        timeout: Timeout = ...,
        extra: commands.Extra | None = ...,
        **sampling: Unpack[commands.SamplingOptions],
    ) -> Stream[Token | ProgressEvent]: ...

    def generate(
        self,
        prompt: str,
        *,
        cache_key: str | None = None,
        progress: bool = False,
        timeout: Timeout = USE_DEFAULT,
        extra: commands.Extra | None = None,
        **sampling: Unpack[commands.SamplingOptions],
    ) -> Stream[Any]:
        """:meth:`Worker.generate <supervisor.worker.Worker.generate>` on the
        member chosen for it; returns that member's stream."""
        tokens = estimate_tokens(text_chars(prompt), sampling.get("max_tokens"))
        lease = self._place(cache_key, tokens)
        member = self._members[lease.member]
        return self._leased(
            lease,
            lambda: member.generate(
                prompt,
                cache_key=cache_key,
                progress=progress,
                timeout=timeout,
                extra=extra,
                **sampling,
            ),
        )

    @overload
    def chat(
        self,
        messages: Sequence[commands.Message],
        *,
        chat_template_kwargs: Mapping[str, object] | None = ...,
        tools: Sequence[Mapping[str, object]] | None = ...,
        cache_key: str | None = ...,
        progress: Literal[False] = False,
        timeout: Timeout = ...,
        extra: commands.Extra | None = ...,
        **sampling: Unpack[commands.SamplingOptions],
    ) -> Stream[Token]: ...

    @overload
    def chat(
        self,
        messages: Sequence[commands.Message],
        *,
        chat_template_kwargs: Mapping[str, object] | None = ...,
        tools: Sequence[Mapping[str, object]] | None = ...,
        cache_key: str | None = ...,
        progress: bool,
        timeout: Timeout = ...,
        extra: commands.Extra | None = ...,
        **sampling: Unpack[commands.SamplingOptions],
    ) -> Stream[Token | ProgressEvent]: ...

    def chat(
        self,
        messages: Sequence[commands.Message],
        *,
        chat_template_kwargs: Mapping[str, object] | None = None,
        tools: Sequence[Mapping[str, object]] | None = None,
        cache_key: str | None = None,
        progress: bool = False,
        timeout: Timeout = USE_DEFAULT,
        extra: commands.Extra | None = None,
        **sampling: Unpack[commands.SamplingOptions],
    ) -> Stream[Any]:
        """:meth:`Worker.chat <supervisor.worker.Worker.chat>` on the member
        chosen for it; returns that member's stream."""
        tokens = estimate_tokens(text_chars(messages), sampling.get("max_tokens"))
        lease = self._place(cache_key, tokens)
        member = self._members[lease.member]
        return self._leased(
            lease,
            lambda: member.chat(
                messages,
                chat_template_kwargs=chat_template_kwargs,
                tools=tools,
                cache_key=cache_key,
                progress=progress,
                timeout=timeout,
                extra=extra,
                **sampling,
            ),
        )

    def tokenize(
        self, text: str, *, add_special_tokens: bool = True, timeout: Timeout = USE_DEFAULT
    ) -> tuple[int, ...]:
        """Tokenize on the least loaded member (they share one model)."""
        member = self._members[self._placement.least_loaded(self._usable())]
        return member.tokenize(text, add_special_tokens=add_special_tokens, timeout=timeout)

    def info(self, *, timeout: Timeout = USE_DEFAULT) -> tuple[InfoReply, ...]:
        """Every member's ``info``, in index order (the first error is raised)."""
        return tuple(_on_all(self._members, lambda w: w.info(timeout=timeout)))

    def load(
        self,
        path: str | os.PathLike[str],
        *,
        adapter_path: str | None = None,
        draft_path: str | None = None,
        context_len: int | None = None,
        trust_remote_code: bool = False,
        force: bool = False,
        on_progress: Callable[[ProgressEvent], None] | None = None,
        timeout: Timeout = USE_DEFAULT,
        extra: commands.Extra | None = None,
    ) -> tuple[Loaded, ...]:
        """Load the model on every member, concurrently. If one fails (or
        dies meanwhile), its error is raised once all have ended; the others
        have the new model, and a restarted member its previous one.
        ``on_progress`` gets every member's events (from their threads)."""
        if on_progress is not None and not callable(on_progress):
            raise InvalidArgument(
                f"on_progress: must be a callable or None, got {type(on_progress).__name__}"
            )
        return tuple(
            _on_all(
                self._members,
                lambda w: w.load(
                    path,
                    adapter_path=adapter_path,
                    draft_path=draft_path,
                    context_len=context_len,
                    trust_remote_code=trust_remote_code,
                    force=force,
                    on_progress=on_progress,
                    timeout=timeout,
                    extra=extra,
                ),
            )
        )

    def stats(self) -> PoolStats:
        """Each member's stats and load, and the pool's totals. A member whose
        stats cannot be read (dead, closed) has ``worker=None`` and the error."""

        def one(i: int) -> MemberStats:
            w = self._members[i]
            worker, error = None, None
            try:
                worker = w.stats()
            except SupervisorError as exc:
                error = str(exc)
            return MemberStats(
                index=i,
                device=self.devices[i % len(self.devices)] if self.devices else None,
                outstanding=self._placement.outstanding(i),
                tokens_in_flight=self._placement.tokens_in_flight(i),
                restarts=w.restarts,
                alive=w.alive,
                worker=worker,
                error=error,
            )

        return PoolStats.of(_on_all_indices(len(self._members), one))

    # -- closing ------------------------------------------------------------------------

    def close(self) -> None:
        """Close every member concurrently, each with its own ladder (quit,
        SIGTERM, SIGKILL); their open streams end as a closed Worker's do.
        Idempotent."""
        self._closed = True
        _on_all(self._members, Worker.close)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<WorkerPool {len(self._members)} members pids={list(self.pids)}{state}>"
