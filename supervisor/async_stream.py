"""Asyncio receivers of one request's output: the twins of :mod:`supervisor.stream`.

Fed by the worker's stdout task on the event loop, read by one task. A token
already received is returned by ``__anext__`` without suspending.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Generic, TypeVar, cast

from protocol.fields import JsonValue
from protocol.replies import Done, ProgressEvent, Reply

from . import arguments
from .errors import SupervisorError
from .lifecycle import ProgressCallback, ReplyBox
from .results import StreamItem, StreamResult, Token

if TYPE_CHECKING:
    from .async_process import AsyncChild
    from .async_worker import AsyncSupervision

__all__ = ["AsyncReplySink", "AsyncStream"]

log = logging.getLogger("supervisor")

T = TypeVar("T", bound=StreamItem)


async def _wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    if event.is_set():
        return True
    if timeout is None:
        await event.wait()
        return True
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except asyncio.TimeoutError:
        return False
    return True


class AsyncReplySink(ReplyBox[asyncio.Event]):
    """Waits for the single reply of a non-streaming request; see
    :class:`~supervisor.stream.ReplySink` for progress events."""

    __slots__ = ()

    def __init__(self, on_progress: ProgressCallback | None = None) -> None:
        super().__init__(asyncio.Event(), on_progress)

    async def wait(self, timeout: float | None) -> bool:
        if self._on_progress is None:
            return await _wait_event(self._event, timeout)
        while await _wait_event(self._event, timeout):
            self._event.clear()
            self.deliver_progress()
            if self.ended:
                self._event.set()
                return True
        return False


class AsyncStream(Generic[T]):
    """The tokens of one ``generate`` or ``chat``; see :class:`~supervisor.stream.Stream`
    (an ``AsyncStream[Token]``, or ``AsyncStream[Token | ProgressEvent]`` with ``progress=True``).

    The request is sent when the stream is entered (``async with``) or first
    read. ``async for`` it (from one task); ``async with`` cancels it on an
    early exit or an exception; ``result`` says how it ended.
    """

    def __init__(
        self,
        supervision: AsyncSupervision,
        cmd: str,
        fields: Mapping[str, JsonValue],
        timeout: float | None,
    ) -> None:
        self._supervision = supervision
        self._request: tuple[str, Mapping[str, JsonValue]] | None = (cmd, fields)
        self._child: AsyncChild | None = None
        self.request_id = 0  # set once the request is sent
        self._timeout = timeout
        self._inbox: list[T] = []
        self._ended = asyncio.Event()
        self._done: Done | None = None
        self._error: SupervisorError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._end_hooks: list[Callable[[], None]] = []
        self._tokens = self._iterate()

    # -- Sink: called by the stdout task ------------------------------------------------

    def tokens(self, batch: list[StreamItem]) -> None:
        items = cast("list[T]", batch)  # progress events come only to a stream that asked
        if self._inbox:
            self._inbox.extend(items)
        else:
            self._inbox = items
        self._wake()

    def progress(self, event: ProgressEvent) -> None:
        self.tokens([event])

    def finish(self, reply: Reply) -> None:
        assert isinstance(reply, Done)
        self._done = reply
        self._ended.set()
        self._wake()
        self._run_end_hooks()

    def fail(self, error: SupervisorError) -> None:
        self._error = error
        self._ended.set()
        self._wake()
        self._run_end_hooks()

    def _run_end_hooks(self) -> None:
        hooks, self._end_hooks = self._end_hooks, []
        for hook in hooks:
            hook()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- reading ----------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[T]:
        # ``async for`` runs the async generator directly: its C-level
        # ``__anext__`` costs about half of a coroutine method per token.
        return self._tokens

    def __anext__(self) -> Awaitable[T]:
        return self._tokens.__anext__()

    async def _iterate(self) -> AsyncGenerator[T, None]:
        child = await self._send()
        while batch := await self._take(child):
            for token in batch:
                yield token

    async def _send(self) -> AsyncChild:
        """Send the request, the first time the stream is entered or read."""
        if self._child is not None:
            return self._child
        assert self._request is not None
        cmd, fields = self._request
        self._request = None
        child = await self._supervision.ready()
        self.request_id, line = child.core.open(cmd, fields, self)
        self._child = child
        child.send(line)
        await child.drain()
        return child

    async def _take(self, child: AsyncChild) -> list[T]:
        """The next batch of tokens; [] at the end; raises the stream's error."""
        while not self._inbox:
            if self._ended.is_set():
                if self._error is not None:
                    raise self._error
                return []
            await self._news(child)
        batch, self._inbox = self._inbox, []
        return batch

    async def _news(self, child: AsyncChild) -> None:
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        timeout = self._timeout
        try:
            if timeout is None:
                await waiter
            else:
                await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            assert timeout is not None
            error = await self._supervision.expire(child, self.request_id, self, timeout)
            self._inbox = []
            self._error = error
            self._ended.set()
            self._run_end_hooks()
        finally:
            self._waiter = None

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    def on_end(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` once when the stream ends, however it ends; at once
        if it has; see :meth:`Stream.on_end <supervisor.stream.Stream.on_end>`.
        A stream closed before it was ever sent also runs it."""
        if self._ended.is_set():
            hook()
        else:
            self._end_hooks.append(hook)

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait for the end (no more than ``timeout`` seconds); True if ended."""
        timeout = arguments.seconds("timeout", timeout, none_ok=True)
        await self._send()
        return await _wait_event(self._ended, timeout)

    @property
    def result(self) -> StreamResult:
        """How the generation ended, once it has (after ``async for``, or
        ``await stream.wait()``); raises the stream's error if it failed."""
        if not self._ended.is_set():
            raise RuntimeError("the stream is still running; await stream.wait() first")
        if self._error is not None:
            raise self._error
        assert self._done is not None
        return StreamResult.of(self._done)

    async def text(self) -> str:
        """Read the remaining tokens and return their text (progress events are skipped)."""
        return "".join([item.text async for item in self if isinstance(item, Token)])

    # -- cancelling ---------------------------------------------------------------------

    async def cancel(self) -> None:
        """Cancel the request; see :meth:`Stream.cancel <supervisor.stream.Stream.cancel>`."""
        if self._ended.is_set() or self._child is None:
            return
        await self._supervision.cancel(self._child, self.request_id, self)

    async def aclose(self) -> None:
        """Cancel if still running, and finish the token iterator."""
        if self._child is None:
            self._run_end_hooks()  # never sent: nothing will end it
        try:
            await self.cancel()
        finally:
            try:
                await self._tokens.aclose()
            except RuntimeError:  # it is being iterated by another task right now
                pass

    async def __aenter__(self) -> AsyncStream[T]:
        await self._send()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            await self.aclose()
            return
        if isinstance(exc, asyncio.CancelledError):
            # The task is being cancelled: ask the worker to stop, without waiting.
            if self._child is not None and not self._ended.is_set():
                self._supervision.cancel_nowait(self._child, self.request_id)
            return
        try:
            await self.aclose()
        except SupervisorError as error:  # do not hide the exception already raised
            log.warning(
                "while leaving stream %d on %s: %s", self.request_id, exc_type.__name__, error
            )

    def __repr__(self) -> str:
        state = "ended" if self._ended.is_set() else "running"
        return f"<AsyncStream id={self.request_id} {state}>"
