"""``AsyncWorker``: the asyncio twin of :class:`~supervisor.worker.Worker`.

Same arguments, same methods (``await``-ed), same errors; streams are
``async for``/``async with``. It starts in ``async with`` or ``await
w.start()``, and closes in ``aclose()``. A worker forgotten without
``aclose()`` is killed by its finalizer (a coroutine cannot run there).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import weakref
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, overload

from protocol.codec import DEFAULT_MAX_LINE_BYTES
from protocol.errors import RequestId
from protocol.fields import JsonValue
from protocol.replies import (
    AttentionFacts,
    HelloReply,
    InfoReply,
    Inspected,
    Loaded,
    ModelFacts,
    Pong,
    ProgressEvent,
    Reply,
    TextReply,
    TokensReply,
    Unloaded,
)

from . import commands
from .async_process import AsyncChild
from .async_stream import AsyncReplySink, AsyncStream
from .core import ErrorFactory
from .errors import (
    InvalidArgument,
    RequestError,
    SupervisorError,
    WorkerClosed,
    WorkerTimeout,
)
from .lifecycle import (
    ProgressCallback,
    QuitSink,
    State,
    accept_hello,
    cancel_ignored,
    expect,
    fixed_error,
    forked_error,
    hello_timeout_error,
    memory_verdict,
    restart_refusal,
    timed_out_error,
)
from .restart import RestartGuard, RestartPolicy
from .results import Token, WorkerStats
from .settings import USE_DEFAULT, Settings, Timeout, optional_path, roots_of, worker_command

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["AsyncWorker"]

log = logging.getLogger("supervisor")


class AsyncSupervision:
    """The state machine of :class:`~supervisor.worker.Supervision`, on asyncio."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._pid = os.getpid()  # a forked child's copy must leave the worker alone
        self._state = State.STARTING
        self._settled = asyncio.Event()  # clear while restarting
        self._child: AsyncChild | None = None
        self._failure: ErrorFactory | None = None
        self._guard = RestartGuard(settings.restart) if settings.restart else None
        self._restart_task: asyncio.Task[None] | None = None
        self._memory_task: asyncio.Task[None] | None = None
        self._closed = False
        self.hello: HelloReply | None = None
        self.model: ModelFacts | None = None
        self.model_fields: commands.Fields | None = None
        self.restarts = 0

    # -- start -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._state is not State.STARTING or self._child is not None:
            raise RuntimeError("the worker was already started")
        child = await self._launch()
        self.hello = await self._handshake(child)
        if self._state is State.STARTING:
            self._state = State.READY
            self._settled.set()
        if self.settings.memory_limit_bytes is not None:
            self._memory_task = asyncio.create_task(self._watch_memory(), name="supervisor-memory")

    async def _launch(self) -> AsyncChild:
        child = await AsyncChild.spawn(self.settings, self._child_exited)
        if self._closed:
            await child.close(None)
            raise WorkerClosed("the worker is closed")
        self._child = child
        log.info("worker %d started: %s", child.pid, " ".join(self.settings.argv))
        return child

    async def _handshake(self, child: AsyncChild) -> HelloReply:
        timeout = self.settings.start_timeout
        sink = AsyncReplySink()
        rid, line = child.core.open("hello", None, sink)
        child.send(line)
        if not await sink.wait(timeout):
            child.kill(f"no hello within {timeout:g} s")
            raise hello_timeout_error(child.pid, child.stderr.tail, timeout, rid)
        return accept_hello(child.pid, child.core, sink.value())

    # -- requests ----------------------------------------------------------------------

    async def ready(self) -> AsyncChild:
        """See :meth:`Supervision.ready <supervisor.worker.Supervision.ready>`."""
        if os.getpid() != self._pid:
            raise forked_error(self._pid)(None)
        while True:
            if self._state is State.CLOSED:
                raise WorkerClosed("the worker is closed")
            if self._state is State.DEAD:
                assert self._failure is not None
                raise self._failure(None)
            child = self._child
            if child is None:
                raise RuntimeError("the worker is not started; use 'async with' or 'await start()'")
            if self._state is State.RESTARTING:
                await self._settled.wait()
            elif child.dying and not child.handled.is_set():
                await child.handled.wait()
            else:
                return child

    async def call(
        self,
        cmd: str,
        fields: Mapping[str, JsonValue] | None,
        timeout: float | None,
        child: AsyncChild | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> Reply:
        child = child or await self.ready()
        sink = AsyncReplySink(on_progress)
        rid, line = child.core.open(cmd, fields, sink)
        child.send(line)
        try:
            await child.drain()
            if not await sink.wait(timeout):
                assert timeout is not None
                raise await self.expire(child, rid, sink, timeout)
        except asyncio.CancelledError:
            if child.core.abandon(rid):
                child.send(child.core.cancel_line(rid))
            raise
        return sink.value()

    async def cancel(self, child: AsyncChild, rid: RequestId, sink: AsyncStream[Any]) -> None:
        if not child.core.is_open(rid):
            return
        error = await self._cancel_or_kill(child, rid, sink, None)
        if error is not None:
            raise error

    def cancel_nowait(self, child: AsyncChild, rid: RequestId) -> None:
        if child.core.is_open(rid):
            child.send(child.core.cancel_line(rid))

    async def expire(
        self,
        child: AsyncChild,
        rid: RequestId,
        sink: AsyncReplySink | AsyncStream[Any],
        timeout: float,
    ) -> WorkerTimeout:
        error = await self._cancel_or_kill(child, rid, sink, timeout)
        return error or timed_out_error(rid, timeout)

    async def _cancel_or_kill(
        self,
        child: AsyncChild,
        rid: RequestId,
        sink: AsyncReplySink | AsyncStream[Any],
        timeout: float | None,
    ) -> WorkerTimeout | None:
        """See :meth:`supervisor.worker.Supervision._cancel_or_kill`."""
        child.send(child.core.cancel_line(rid))
        grace = self.settings.cancel_grace
        if await sink.wait(grace):
            return None
        error, reason = cancel_ignored(rid, grace, timeout)
        child.core.fail(rid, error)
        child.kill(reason)
        return error

    # -- crashes and restarts ------------------------------------------------------------

    def _child_exited(self, child: AsyncChild, make_error: ErrorFactory) -> None:
        """Runs in the dead child's stdout task, after its requests failed."""
        if child is not self._child or self._state is not State.READY or child.closing:
            return
        log.error("%s", make_error(None))
        if not self._may_restart(make_error):
            return
        self._state = State.RESTARTING
        self._settled.clear()
        self._restart_task = asyncio.create_task(self._restart(child), name="supervisor-restart")

    def _may_restart(self, make_error: ErrorFactory) -> bool:
        refusal = restart_refusal(self._guard, make_error)
        if refusal is None:
            return True
        self._die(refusal)
        return False

    def _die(self, make_error: ErrorFactory) -> None:
        self._state = State.DEAD
        self._failure = make_error
        self._settled.set()

    async def _restart(self, old: AsyncChild) -> None:
        await old.close(None)
        while self._state is State.RESTARTING:
            try:
                child = await self._launch()
            except SupervisorError as exc:
                if self._state is State.RESTARTING:
                    self._die(fixed_error(exc))
                return
            try:
                hello = await self._handshake(child)
                if self.model_fields is not None:
                    reply = await self.call(
                        "load", self.model_fields, self.settings.request_timeout, child
                    )
                    self.model = expect(reply, Loaded).model
            except SupervisorError as exc:
                log.error("restarting the worker failed: %s", exc)
                if self._state is not State.RESTARTING:
                    return
                retry = self._may_restart(fixed_error(exc))
                await child.close(None)
                if retry:
                    continue
                return
            if self._state is not State.RESTARTING:
                return
            self.hello = hello
            self.restarts += 1
            self._state = State.READY
            self._settled.set()
            log.warning("worker restarted as %d (restart %d)", child.pid, self.restarts)
            return

    # -- memory ----------------------------------------------------------------------------

    async def _watch_memory(self) -> None:
        limit = self.settings.memory_limit_bytes
        assert limit is not None
        while True:
            await asyncio.sleep(self.settings.memory_poll_interval)
            child = self._child if self._state is State.READY else None
            if child is None or child.dying:
                continue
            verdict = memory_verdict(child.probe, limit)
            if verdict is not None:
                reason, error = verdict
                log.error("%s", reason)
                child.kill(reason, error)

    async def stats(self) -> WorkerStats:
        child = await self.ready()
        try:
            reply = await self.call("info", None, self.settings.request_timeout, child)
            mlx = expect(reply, InfoReply).memory
        except RequestError as exc:
            if exc.code != "no_model":
                raise
            mlx = None
        return child.probe.stats(mlx)

    # -- close ---------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._state not in (State.DEAD, State.CLOSED)

    @property
    def child(self) -> AsyncChild | None:
        return self._child

    async def aclose(self) -> None:
        if self._closed or os.getpid() != self._pid:
            return
        self._closed = True
        self._state = State.CLOSED
        self._settled.set()
        child = self._child
        try:
            if self._memory_task is not None:
                self._memory_task.cancel()
                await asyncio.wait([self._memory_task])
            if child is not None:
                child.closing = True
                quit_line = None
                if child.returncode is None:
                    try:
                        _, quit_line = child.core.open("quit", None, QuitSink())
                    except SupervisorError:
                        pass
                started = time.perf_counter()
                await child.close(quit_line)
                log.info(
                    "worker %d closed in %.0f ms (exit status %s)",
                    child.pid,
                    (time.perf_counter() - started) * 1000,
                    child.returncode,
                )
            if self._restart_task is not None:
                await self._restart_task
        except BaseException:
            self.kill_now()
            if self._restart_task is not None:
                self._restart_task.cancel()
            raise

    def kill_now(self) -> None:
        """SIGKILL the live worker, from any thread; for finalizers. Not from
        a forked child of the host: the worker is the parent's."""
        if os.getpid() != self._pid:
            return
        child = self._child
        if child is not None and child.returncode is None:
            try:
                os.kill(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _kill_forgotten(supervision: AsyncSupervision) -> None:
    child = supervision.child
    if child is not None and child.returncode is None:
        log.warning("AsyncWorker was never closed; killing worker %d", child.pid)
        supervision.kill_now()


class AsyncWorker:
    """A worker process driven from asyncio; see :class:`~supervisor.worker.Worker`.

    ::

        async with AsyncWorker(model="path/to/model") as w:
            async with w.chat([{"role": "user", "content": "hi"}], max_tokens=64) as stream:
                async for token in stream:
                    print(token.text, end="", flush=True)
            print(stream.result.finish_reason, stream.result.usage)

    The process starts in ``__aenter__`` (or ``await w.start()``), so the
    constructor may run outside a running event loop.
    """

    def __init__(
        self,
        command: Sequence[str] | None = None,
        *,
        model: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        inherit_env: bool = True,
        cwd: str | os.PathLike[str] | None = None,
        start_timeout: float = 30.0,
        request_timeout: float | None = None,
        cancel_grace: float = 2.0,
        quit_timeout: float = 2.0,
        term_timeout: float = 2.0,
        kill_timeout: float = 5.0,
        restart: RestartPolicy | None = None,
        memory_limit_bytes: int | None = None,
        memory_poll_interval: float = 0.5,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        model_root: str | os.PathLike[str] | None = None,
        image_roots: Sequence[str | os.PathLike[str]] | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        if env is not None and not isinstance(env, Mapping):
            raise InvalidArgument(f"env: must be a mapping of strings, got {type(env).__name__}")
        self.settings = Settings(
            command=worker_command(command),
            env=dict(env) if env is not None else None,
            inherit_env=inherit_env,
            cwd=optional_path(cwd, "cwd"),
            start_timeout=start_timeout,
            request_timeout=request_timeout,
            cancel_grace=cancel_grace,
            quit_timeout=quit_timeout,
            term_timeout=term_timeout,
            kill_timeout=kill_timeout,
            restart=restart,
            memory_limit_bytes=memory_limit_bytes,
            memory_poll_interval=memory_poll_interval,
            max_line_bytes=max_line_bytes,
            model_root=optional_path(model_root, "model_root"),
            image_roots=roots_of(image_roots),
            trust_remote_code=trust_remote_code,
        )
        # Checked now: a bad model path spawns nothing.
        model_fields = (
            commands.load_fields(model, trust_remote_code=trust_remote_code)
            if model is not None
            else None
        )
        self._model_fields = model_fields
        self._sup = AsyncSupervision(self.settings)
        self._finalizer = weakref.finalize(self, _kill_forgotten, self._sup)

    async def start(self) -> AsyncWorker:
        """Spawn the worker, wait for its ``hello``, load ``model`` if given."""
        try:
            await self._sup.start()
            if self._model_fields is not None:
                await self._load(self._model_fields, self.settings.request_timeout)
        except BaseException:
            await self.aclose()
            raise
        return self

    # -- state ------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        """The pid of the current (or last) worker process; a restart changes it."""
        child = self._sup.child
        if child is None:
            raise RuntimeError("the worker is not started")
        return child.pid

    @property
    def returncode(self) -> int | None:
        child = self._sup.child
        return child.returncode if child is not None else None

    @property
    def hello(self) -> HelloReply:
        if self._sup.hello is None:
            raise RuntimeError("the worker is not started")
        return self._sup.hello

    @property
    def model(self) -> ModelFacts | None:
        return self._sup.model

    @property
    def restarts(self) -> int:
        return self._sup.restarts

    @property
    def alive(self) -> bool:
        """False once the worker is closed, or has died with no restart left
        (its requests then raise that error); True while starting or restarting."""
        return self._sup.alive

    # -- requests -----------------------------------------------------------------------

    async def load(
        self,
        path: str | os.PathLike[str],
        *,
        adapter_path: str | None = None,
        draft_path: str | None = None,
        context_len: int | None = None,
        trust_remote_code: bool = False,
        force: bool = False,
        on_progress: ProgressCallback | None = None,
        timeout: Timeout = USE_DEFAULT,
        extra: commands.Extra | None = None,
    ) -> Loaded:
        """See :meth:`Worker.load <supervisor.worker.Worker.load>`; ``on_progress``
        (a plain callable, not a coroutine function) runs in the awaiting task."""
        if on_progress is not None and not callable(on_progress):
            raise InvalidArgument(
                f"on_progress: must be a callable or None, got {type(on_progress).__name__}"
            )
        fields = commands.load_fields(
            path,
            adapter_path=adapter_path,
            draft_path=draft_path,
            context_len=context_len,
            trust_remote_code=trust_remote_code,
            force=force,
            progress=on_progress is not None,
            extra=extra,
        )
        return await self._load(fields, self.settings.timeout(timeout), on_progress)

    async def _load(
        self,
        fields: commands.Fields,
        timeout: float | None,
        on_progress: ProgressCallback | None = None,
    ) -> Loaded:
        reply = await self._sup.call("load", fields, timeout, on_progress=on_progress)
        loaded = expect(reply, Loaded)
        self._sup.model = loaded.model
        self._sup.model_fields = commands.without_progress(fields)
        return loaded

    async def unload(self, *, timeout: Timeout = USE_DEFAULT) -> bool:
        reply = await self._sup.call("unload", None, self.settings.timeout(timeout))
        self._sup.model, self._sup.model_fields = None, None
        return expect(reply, Unloaded).was_loaded

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
        """A stream of the completion of ``prompt``; sent when entered or first
        read. ``progress`` as for :meth:`Worker.generate <supervisor.worker.Worker.generate>`."""
        fields = commands.generate_fields(
            prompt,
            commands.sampling_fields(sampling),
            cache_key=cache_key,
            progress=progress,
            extra=extra,
        )
        stream: AsyncStream[Any] = AsyncStream(
            self._sup, "generate", fields, self.settings.timeout(timeout)
        )
        return stream

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
        """A stream of the answer to ``messages``; sent when entered or first read."""
        fields = commands.chat_fields(
            messages,
            commands.sampling_fields(sampling),
            chat_template_kwargs=chat_template_kwargs,
            tools=tools,
            cache_key=cache_key,
            progress=progress,
            extra=extra,
        )
        stream: AsyncStream[Any] = AsyncStream(
            self._sup, "chat", fields, self.settings.timeout(timeout)
        )
        return stream

    async def info(self, *, timeout: Timeout = USE_DEFAULT) -> InfoReply:
        reply = await self._sup.call("info", None, self.settings.timeout(timeout))
        return expect(reply, InfoReply)

    async def tokenize(
        self, text: str, *, add_special_tokens: bool = True, timeout: Timeout = USE_DEFAULT
    ) -> tuple[int, ...]:
        fields = commands.tokenize_fields(text, add_special_tokens=add_special_tokens)
        reply = await self._sup.call("tokenize", fields, self.settings.timeout(timeout))
        return expect(reply, TokensReply).tokens

    async def detokenize(self, tokens: Sequence[int], *, timeout: Timeout = USE_DEFAULT) -> str:
        fields = commands.detokenize_fields(tokens)
        reply = await self._sup.call("detokenize", fields, self.settings.timeout(timeout))
        return expect(reply, TextReply).text

    async def inspect(
        self,
        prompt: str,
        *,
        directory: str | os.PathLike[str] | None = None,
        timeout: Timeout = USE_DEFAULT,
    ) -> AttentionFacts:
        """Write each layer's attention queries and keys for ``prompt`` into
        ``directory`` (a new temporary one when None); see docs/protocol.md."""
        fields = commands.inspect_fields(prompt, directory)
        reply = await self._sup.call("inspect", fields, self.settings.timeout(timeout))
        return expect(reply, Inspected).attention

    async def ping(self, *, timeout: Timeout = USE_DEFAULT) -> float:
        started = time.perf_counter()
        expect(await self._sup.call("ping", None, self.settings.timeout(timeout)), Pong)
        return time.perf_counter() - started

    async def stats(self) -> WorkerStats:
        return await self._sup.stats()

    # -- closing ------------------------------------------------------------------------

    async def aclose(self) -> None:
        """The close ladder (quit, SIGTERM, SIGKILL); idempotent. If this is
        cancelled, the worker is killed rather than left behind."""
        try:
            await self._sup.aclose()
        finally:
            self._finalizer.detach()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    async def __aenter__(self) -> AsyncWorker:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        child = self._sup.child
        where = f"pid={child.pid}" if child is not None else "not started"
        state = " closed" if self.closed else ""
        return f"<AsyncWorker {where}{state} {' '.join(self.settings.command)!r}>"
