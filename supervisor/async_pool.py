"""``AsyncWorkerPool``: the asyncio twin of :class:`~supervisor.pool.WorkerPool`.

The same I/O-free core (:mod:`supervisor.placement`); the members are
``AsyncWorker`` s, started, loaded and closed together with ``asyncio.gather``.
"""

from __future__ import annotations

import asyncio
import os
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from protocol.replies import InfoReply, Loaded, ProgressEvent

from . import commands
from .async_stream import AsyncStream
from .async_worker import AsyncWorker
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

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["AsyncWorkerPool"]

R = TypeVar("R")


async def _on_all(
    workers: Sequence[AsyncWorker], call: Callable[[AsyncWorker], Awaitable[R]]
) -> list[R]:
    """``call`` on every member concurrently; raises the first error (by
    member index) once every call has ended."""
    results = await asyncio.gather(*(call(w) for w in workers), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results  # type: ignore[return-value]


class AsyncWorkerPool:
    """N ``AsyncWorker`` s behind one API; see :class:`~supervisor.pool.WorkerPool`.

    ::

        async with AsyncWorkerPool(devices=[0, 1], model="path/to/model") as pool:
            async with pool.chat(messages, cache_key="conversation-7") as stream:
                async for token in stream:
                    ...

    The members start in ``__aenter__`` (or ``await pool.start()``), so the
    constructor may run outside an event loop; it checks every argument.
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
        self._members = tuple(
            AsyncWorker(command, model=model, env=envs[i], **kwargs) for i in range(count)
        )
        self._closed = False

    async def start(self) -> AsyncWorkerPool:
        """Start every member concurrently (loading ``model``); if one fails,
        close them all and raise its error."""
        try:
            await _on_all(self._members, AsyncWorker.start)
        except BaseException:
            await self.aclose()
            raise
        return self

    # -- state ------------------------------------------------------------------------

    @property
    def members(self) -> tuple[AsyncWorker, ...]:
        return self._members

    def __len__(self) -> int:
        return len(self._members)

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(w.pid for w in self._members)

    @property
    def placement(self) -> Placement:
        return self._placement

    def _usable(self) -> set[int]:
        return {i for i, w in enumerate(self._members) if w.alive}

    def _place(self, cache_key: object, tokens: int) -> Lease:
        if self._closed:
            return self._placement.place(None, tokens)
        key = cache_key if isinstance(cache_key, str) else None
        return self._placement.place(key, tokens, self._usable())

    @staticmethod
    def _leased(lease: Lease, make: Callable[[], AsyncStream[Any]]) -> AsyncStream[Any]:
        try:
            stream = make()
        except BaseException:
            lease.release()
            raise
        stream.on_end(lease.release)
        # A stream dropped before it was ever sent (never entered nor read)
        # does not end; its collection releases the lease instead.
        weakref.finalize(stream, lease.release)
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
    ) -> AsyncStream[Token]: ...

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
    ) -> AsyncStream[Token | ProgressEvent]: ...

    def generate(
        self,
        prompt: str,
        *,
        cache_key: str | None = None,
        progress: bool = False,
        timeout: Timeout = USE_DEFAULT,
        extra: commands.Extra | None = None,
        **sampling: Unpack[commands.SamplingOptions],
    ) -> AsyncStream[Any]:
        """``AsyncWorker.generate`` on the member chosen for it; its stream."""
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
    ) -> AsyncStream[Token]: ...

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
    ) -> AsyncStream[Token | ProgressEvent]: ...

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
    ) -> AsyncStream[Any]:
        """``AsyncWorker.chat`` on the member chosen for it; its stream."""
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

    async def tokenize(
        self, text: str, *, add_special_tokens: bool = True, timeout: Timeout = USE_DEFAULT
    ) -> tuple[int, ...]:
        """Tokenize on the least loaded member."""
        member = self._members[self._placement.least_loaded(self._usable())]
        return await member.tokenize(text, add_special_tokens=add_special_tokens, timeout=timeout)

    async def info(self, *, timeout: Timeout = USE_DEFAULT) -> tuple[InfoReply, ...]:
        """Every member's ``info``, in index order (the first error is raised)."""
        return tuple(await _on_all(self._members, lambda w: w.info(timeout=timeout)))

    async def load(
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
        """Load the model on every member, concurrently; see
        :meth:`WorkerPool.load <supervisor.pool.WorkerPool.load>`."""
        if on_progress is not None and not callable(on_progress):
            raise InvalidArgument(
                f"on_progress: must be a callable or None, got {type(on_progress).__name__}"
            )
        return tuple(
            await _on_all(
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

    async def stats(self) -> PoolStats:
        """Each member's stats and load, and the pool's totals."""

        async def one(i: int) -> MemberStats:
            w = self._members[i]
            worker, error = None, None
            try:
                worker = await w.stats()
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

        return PoolStats.of(await asyncio.gather(*(one(i) for i in range(len(self._members)))))

    # -- closing ------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close every member concurrently, each with its own ladder; idempotent.
        If this is cancelled, each member kills its worker rather than leave it."""
        self._closed = True
        await _on_all(self._members, AsyncWorker.aclose)

    @property
    def closed(self) -> bool:
        return self._closed

    async def __aenter__(self) -> AsyncWorkerPool:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<AsyncWorkerPool {len(self._members)} members{state}>"
