"""Sync receivers of one request's output: ``Stream`` for generations, ``Reply`` for the rest.

Both are :class:`~supervisor.core.Sink` s, fed by the worker's stdout thread
and read by any one thread of the host. Tokens arrive in batches (one per
chunk read from the pipe), so a reader takes one lock per batch, not per token.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Generator, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Generic, TypeVar, cast

from protocol.replies import Done, ProgressEvent, Reply

from . import arguments
from .errors import SupervisorError
from .lifecycle import ProgressCallback, ReplyBox
from .results import StreamItem, StreamResult, Token

if TYPE_CHECKING:
    from .process import SyncChild
    from .worker import Supervision

__all__ = ["ReplySink", "Stream"]

log = logging.getLogger("supervisor")

T = TypeVar("T", bound=StreamItem)
"""What a stream yields: ``Token``, or ``Token | ProgressEvent`` with ``progress=True``."""


class ReplySink(ReplyBox[threading.Event]):
    """Waits for the single reply of a non-streaming request, handing any
    progress events to ``on_progress`` meanwhile; ``timeout`` is the longest
    wait for the next line (a progress event starts it again)."""

    __slots__ = ()

    def __init__(self, on_progress: ProgressCallback | None = None) -> None:
        super().__init__(threading.Event(), on_progress)

    def wait(self, timeout: float | None) -> bool:
        if self._on_progress is None:
            return self._event.wait(timeout)
        while self._event.wait(timeout):
            self._event.clear()  # before the reads: a later set is seen by the next wait
            self.deliver_progress()
            if self.ended:
                self._event.set()
                return True
        return False


class Stream(Generic[T]):
    """The tokens of one ``generate`` or ``chat``, as they arrive.

    Iterate it (once, from one thread) for :class:`~supervisor.results.Token`
    events (a ``Stream[Token]``); sent with ``progress=True`` it is a
    ``Stream[Token | ProgressEvent]`` and also yields the worker's
    :class:`~protocol.replies.ProgressEvent` s (prefill), in order with the
    tokens. ``result`` then holds the finish reason, usage and timings. Use
    it as a context manager: leaving the block before the end, or on an
    exception, cancels the request. If the worker ends with an error, the
    tokens that came before it are yielded first, then the error is raised.
    """

    def __init__(self, supervision: Supervision, child: SyncChild, timeout: float | None) -> None:
        self._supervision = supervision
        self._child = child
        self.request_id = 0  # set once the request is registered
        self._timeout = timeout
        self._cond = threading.Condition(threading.Lock())
        self._inbox: list[T] = []
        self._ended = False
        self._done: Done | None = None
        self._error: SupervisorError | None = None
        self._end_hooks: list[Callable[[], None]] = []
        self._tokens = self._iterate()

    # -- Sink: called by the stdout thread ---------------------------------------------

    def tokens(self, batch: list[StreamItem]) -> None:
        items = cast("list[T]", batch)  # progress events come only to a Stream that asked
        with self._cond:
            if self._inbox:
                self._inbox.extend(items)
            else:
                self._inbox = items
            self._cond.notify()

    def progress(self, event: ProgressEvent) -> None:
        self.tokens([event])

    def finish(self, reply: Reply) -> None:
        with self._cond:
            assert isinstance(reply, Done)
            self._done = reply
            self._ended = True
            self._run_end_hooks()
            self._cond.notify_all()

    def fail(self, error: SupervisorError) -> None:
        with self._cond:
            self._error = error
            self._ended = True
            self._run_end_hooks()
            self._cond.notify_all()

    def _run_end_hooks(self) -> None:
        """Lock held: a reader woken by the end sees the hooks' effects."""
        hooks, self._end_hooks = self._end_hooks, []
        for hook in hooks:
            hook()

    # -- reading ----------------------------------------------------------------------

    def __iter__(self) -> Iterator[T]:
        return self._tokens  # ``for`` runs the generator directly: no call per token

    def __next__(self) -> T:
        return next(self._tokens)

    def _iterate(self) -> Generator[T, None, None]:
        while batch := self._take():
            yield from batch

    def _take(self) -> list[T]:
        """The next batch of tokens; [] at the end; raises the stream's error."""
        with self._cond:
            if self._cond.wait_for(self._has_news, self._timeout):
                batch, self._inbox = self._inbox, []
                if batch:
                    return batch
                if self._error is not None:
                    raise self._error
                return []
        assert self._timeout is not None
        error = self._supervision.expire(self._child, self.request_id, self, self._timeout)
        with self._cond:
            self._error = error
            self._ended = True
        raise error

    def _has_news(self) -> bool:
        return bool(self._inbox) or self._ended

    @property
    def ended(self) -> bool:
        return self._ended

    def on_end(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` once when the stream ends, however it ends (done,
        error, cancel, crash, close); at once if it has already ended. It runs
        on the thread that ends the stream (often the worker's stdout thread),
        with the stream's lock held, before a reader waiting for the end wakes:
        it must be quick and must not touch the stream or call the worker.
        ``WorkerPool`` counts a member's outstanding requests with it."""
        with self._cond:
            if not self._ended:
                self._end_hooks.append(hook)
                return
        hook()

    @property
    def result(self) -> StreamResult:
        """How the generation ended. Waits for the end if need be (tokens not
        yet read stay readable); raises the stream's error if it failed."""
        self.wait()
        with self._cond:
            if self._error is not None:
                raise self._error
            assert self._done is not None
            return StreamResult.of(self._done)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the end (no more than ``timeout`` seconds); True if ended."""
        timeout = arguments.seconds("timeout", timeout, none_ok=True)
        with self._cond:
            return self._cond.wait_for(lambda: self._ended, timeout)

    def text(self) -> str:
        """Read the remaining tokens and return their text (progress events are skipped)."""
        return "".join([item.text for item in self if isinstance(item, Token)])

    # -- cancelling ---------------------------------------------------------------------

    def cancel(self) -> None:
        """Ask the worker to stop this request and wait for its terminal line.

        If that line does not come within the worker's ``cancel_grace``, the
        worker is taken for hung: it is killed (and restarted, under a restart
        policy), this stream ends with :class:`WorkerTimeout`, and that is
        raised. Does nothing once the stream has ended.
        """
        if self._ended:
            return
        self._supervision.cancel(self._child, self.request_id, self)

    def close(self) -> None:
        """Cancel if still running; what the context manager does on exit."""
        self._tokens.close()
        self.cancel()

    def __enter__(self) -> Stream[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except SupervisorError as error:  # do not hide the exception already raised
            log.warning(
                "while leaving stream %d on %s: %s", self.request_id, exc_type.__name__, error
            )

    def __repr__(self) -> str:
        state = "ended" if self._ended else "running"
        return f"<Stream id={self.request_id} {state}>"
