"""``Worker``: drive one worker process from synchronous Python, from any threads.

``Worker`` is the public face: typed methods that build requests and return
replies or streams. ``Supervision`` owns the life of the worker behind it:
start (``hello``, then the model), restarts, the memory watch, timeouts and
the close ladder. The split lets a ``weakref.finalize`` close a forgotten
worker: nothing that outlives the ``Worker`` (pipe threads, streams) refers
to it, only to its ``Supervision``.
"""

from __future__ import annotations

import logging
import os
import threading
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
from .process import SyncChild
from .restart import RestartGuard, RestartPolicy
from .results import Token, WorkerStats
from .settings import USE_DEFAULT, Settings, Timeout, optional_path, roots_of, worker_command
from .stream import ReplySink, Stream

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["Worker"]

log = logging.getLogger("supervisor")


class Supervision:
    """The state machine behind a ``Worker``::

    STARTING -> READY <-> RESTARTING
                  |            |
                  v            v
                 DEAD  ->   CLOSED   (close() from any state)
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._pid = os.getpid()  # a forked child's copy must leave the worker alone
        self._cond = threading.Condition()
        self._state = State.STARTING
        self._child: SyncChild | None = None
        self._failure: ErrorFactory | None = None
        self._guard = RestartGuard(settings.restart) if settings.restart else None
        self._retired: list[threading.Thread] = []
        self._stop = threading.Event()
        self._memory_thread: threading.Thread | None = None
        self._closed = False
        self.hello: HelloReply | None = None
        self.model: ModelFacts | None = None
        self.model_fields: commands.Fields | None = None
        self.restarts = 0

    # -- start -------------------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            child = self._launch()
        self.hello = self._handshake(child)
        with self._cond:
            if self._state is State.STARTING:
                self._state = State.READY
        if self.settings.memory_limit_bytes is not None:
            self._memory_thread = threading.Thread(
                target=self._watch_memory, name="supervisor-memory", daemon=True
            )
            self._memory_thread.start()

    def _launch(self) -> SyncChild:
        """Spawn a child and make it current (lock held)."""
        child = SyncChild(self.settings, self._child_exited)
        self._child = child
        log.info("worker %d started: %s", child.pid, " ".join(self.settings.argv))
        return child

    def _handshake(self, child: SyncChild) -> HelloReply:
        timeout = self.settings.start_timeout
        sink = ReplySink()
        rid, line = child.core.open("hello", None, sink)
        child.send(line)
        if not sink.wait(timeout):
            child.kill(f"no hello within {timeout:g} s")
            raise hello_timeout_error(child.pid, child.stderr.tail, timeout, rid)
        return accept_hello(child.pid, child.core, sink.value())

    # -- requests ----------------------------------------------------------------------

    def ready(self) -> SyncChild:
        """The live child, after any restart in progress; raises if there is none.

        A child that we killed (or that is known dead) is waited out until its
        exit has been handled, so a request right after a kill goes to the
        restarted worker, or fails with the reason, instead of into the void.
        """
        if os.getpid() != self._pid:
            raise forked_error(self._pid)(None)
        with self._cond:
            while True:
                if self._state is State.CLOSED:
                    raise WorkerClosed("the worker is closed")
                if self._state is State.DEAD:
                    assert self._failure is not None
                    raise self._failure(None)
                child = self._child
                assert child is not None
                if self._state is State.RESTARTING or (child.dying and not child.handled):
                    self._cond.wait()
                    continue
                return child

    def call(
        self,
        cmd: str,
        fields: Mapping[str, JsonValue] | None,
        timeout: float | None,
        child: SyncChild | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> Reply:
        child = child or self.ready()
        sink = ReplySink(on_progress)
        rid, line = child.core.open(cmd, fields, sink)
        child.send(line)
        if not sink.wait(timeout):
            assert timeout is not None
            raise self.expire(child, rid, sink, timeout)
        return sink.value()

    def stream(
        self, cmd: str, fields: Mapping[str, JsonValue], timeout: float | None
    ) -> Stream[Any]:
        child = self.ready()
        stream: Stream[Any] = Stream(self, child, timeout)
        stream.request_id, line = child.core.open(cmd, fields, stream)
        child.send(line)
        return stream

    def cancel(self, child: SyncChild, rid: RequestId, sink: Stream[Any]) -> None:
        if not child.core.is_open(rid):
            return
        error = self._cancel_or_kill(child, rid, sink, None)
        if error is not None:
            raise error

    def expire(
        self, child: SyncChild, rid: RequestId, sink: ReplySink | Stream[Any], timeout: float
    ) -> WorkerTimeout:
        """A request's timeout passed: cancel it, and kill a worker that does
        not even end it then. Returns the error to raise."""
        return self._cancel_or_kill(child, rid, sink, timeout) or timed_out_error(rid, timeout)

    def _cancel_or_kill(
        self,
        child: SyncChild,
        rid: RequestId,
        sink: ReplySink | Stream[Any],
        timeout: float | None,
    ) -> WorkerTimeout | None:
        """Cancel ``rid`` and wait ``cancel_grace`` for its end. If it does not
        come, end the request with a ``WorkerTimeout``, kill the worker, and
        return that error; None if the request ended."""
        child.send(child.core.cancel_line(rid))
        grace = self.settings.cancel_grace
        if sink.wait(grace):
            return None
        error, reason = cancel_ignored(rid, grace, timeout)
        child.core.fail(rid, error)
        child.kill(reason)
        return error

    # -- crashes and restarts ------------------------------------------------------------

    def _child_exited(self, child: SyncChild, make_error: ErrorFactory) -> None:
        """Runs on the dead child's stdout thread, after its requests failed."""
        with self._cond:
            child.handled = True
            self._cond.notify_all()
            if child is not self._child or self._state is not State.READY or child.closing:
                return  # closing, starting (the handshake raises), or restarting (retried there)
            log.error("%s", make_error(None))
            if not self._may_restart(make_error):
                return
            self._state = State.RESTARTING
            self._retired.append(threading.current_thread())
        child.close(None)
        self._restart()

    def _may_restart(self, make_error: ErrorFactory) -> bool:
        """Lock held. False (and DEAD) if there is no policy or the guard says no."""
        refusal = restart_refusal(self._guard, make_error)
        if refusal is None:
            return True
        self._die(refusal)
        return False

    def _die(self, make_error: ErrorFactory) -> None:
        """Lock held."""
        self._state = State.DEAD
        self._failure = make_error
        self._cond.notify_all()

    def _restart(self) -> None:
        """Spawn, handshake and reload until it works or the guard gives up."""
        while True:
            with self._cond:
                if self._state is not State.RESTARTING:
                    return
                try:
                    child = self._launch()
                except SupervisorError as exc:
                    self._die(fixed_error(exc))
                    return
            try:
                hello = self._handshake(child)
                if self.model_fields is not None:
                    loaded = expect(
                        self.call("load", self.model_fields, self.settings.request_timeout, child),
                        Loaded,
                    )
                    self.model = loaded.model
            except SupervisorError as exc:
                log.error("restarting the worker failed: %s", exc)
                with self._cond:
                    if self._state is not State.RESTARTING:
                        return
                    retry = self._may_restart(fixed_error(exc))
                child.close(None)
                if retry:
                    continue
                return
            with self._cond:
                if self._state is not State.RESTARTING:
                    return  # closed meanwhile; close() took care of the child
                self.hello = hello
                self.restarts += 1
                self._state = State.READY
                self._cond.notify_all()
            log.warning("worker restarted as %d (restart %d)", child.pid, self.restarts)
            return

    # -- memory ----------------------------------------------------------------------------

    def _watch_memory(self) -> None:
        limit = self.settings.memory_limit_bytes
        assert limit is not None
        while not self._stop.wait(self.settings.memory_poll_interval):
            with self._cond:
                child = self._child if self._state is State.READY else None
            if child is None or child.dying:
                continue
            verdict = memory_verdict(child.probe, limit)
            if verdict is not None:
                reason, error = verdict
                log.error("%s", reason)
                child.kill(reason, error)

    def stats(self) -> WorkerStats:
        child = self.ready()
        try:
            info = expect(self.call("info", None, self.settings.request_timeout, child), InfoReply)
            mlx = info.memory
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
    def child(self) -> SyncChild | None:
        return self._child

    def close(self) -> None:
        """The close ladder on the live child, then join every thread. Idempotent.
        Nothing in a forked child of the host: the worker is the parent's."""
        if os.getpid() != self._pid:
            return
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._state = State.CLOSED
            self._cond.notify_all()
            child = self._child
            retired, self._retired = self._retired, []
        self._stop.set()
        me = threading.current_thread()
        if self._memory_thread is not None and self._memory_thread is not me:
            self._memory_thread.join()
        if child is not None:
            child.closing = True
            quit_line = None
            if child.returncode is None:
                try:
                    _, quit_line = child.core.open("quit", None, QuitSink())
                except SupervisorError:
                    pass  # it is already going
            started = time.perf_counter()
            child.close(quit_line)
            log.info(
                "worker %d closed in %.0f ms (exit status %s)",
                child.pid,
                (time.perf_counter() - started) * 1000,
                child.returncode,
            )
        for thread in retired:
            if thread is not me:
                thread.join()


class Worker:
    """A worker process, started now and ready when the constructor returns.

    ::

        with Worker(model="path/to/model") as w:
            with w.chat([{"role": "user", "content": "hi"}], max_tokens=64) as stream:
                for token in stream:
                    print(token.text, end="", flush=True)
            print(stream.result.finish_reason, stream.result.usage)

    ``command`` is the worker's argv (default ``module_command("bridge")``:
    ``[sys.executable, "-P", "-m", "bridge"]``, which a ``bridge.py`` in the
    working directory cannot shadow; ``module_command("mock_worker")`` for the
    mock).
    ``env`` is added to this process's environment (all of it, with
    ``inherit_env=False``); pass secrets there, never in ``command``.
    Readiness is the worker's ``hello`` reply within ``start_timeout``; an
    early exit raises :class:`WorkerCrashed` with the stderr tail. With
    ``model`` the model is loaded before the constructor returns.

    Every method may be called from any thread, and streams may run
    concurrently (the worker queues them). ``timeout`` arguments default to
    ``request_timeout``: the longest wait for the next line of that request.
    ``model_root``, ``image_roots`` and ``trust_remote_code`` start the
    worker with its ``--model-root``, ``--image-root`` and
    ``--trust-remote-code`` flags; with ``trust_remote_code`` the ``model``
    given here is also loaded asking for it. See
    :class:`~supervisor.settings.Settings` for these and the other knobs.

    Every argument, here and in every method, is checked before anything is
    spawned or sent: a bad one raises :class:`~supervisor.errors.InvalidArgument`
    naming it (request fields are checked by the protocol's own parser).

    A child process forked by the host closes its copies of the worker's
    pipes (:mod:`supervisor.forks`), and its copy of this object refuses
    requests with ``WorkerClosed`` and never quits or kills the worker.
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
        self._sup = Supervision(self.settings)
        self._finalizer = weakref.finalize(self, self._sup.close)
        try:
            self._sup.start()
            if model_fields is not None:
                self._load(model_fields, self.settings.request_timeout)
        except BaseException:
            self.close()
            raise

    # -- state ------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        """The pid of the current (or last) worker process; a restart changes it."""
        child = self._sup.child
        assert child is not None
        return child.pid

    @property
    def returncode(self) -> int | None:
        """The worker's exit status once it has ended (negative: killed by that signal)."""
        child = self._sup.child
        return child.returncode if child is not None else None

    @property
    def hello(self) -> HelloReply:
        """The worker's ``hello``: protocol version, versions, commands, limits."""
        assert self._sup.hello is not None
        return self._sup.hello

    @property
    def model(self) -> ModelFacts | None:
        """The model loaded through this worker, if any."""
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

    def load(
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
        """Load a model (replacing the current one); it is reloaded after a restart.

        ``on_progress``, if given, asks the worker for the load's progress
        (``"progress": true``) and is called with each
        :class:`~protocol.replies.ProgressEvent` (stage ``load``: ``step``
        ``checking``, ``weights``, ``tokenizer``, ``ready``, with ``done`` of
        ``total`` ``unit`` where known), in order, on the calling thread,
        before this returns. ``timeout`` is then the longest wait for the
        next event or the reply. An exception from the callback propagates;
        the load itself still completes in the worker. A worker that does not
        report progress simply never calls it. Reloads after a restart do not
        report progress.
        """
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
        return self._load(fields, self.settings.timeout(timeout), on_progress)

    def _load(
        self,
        fields: commands.Fields,
        timeout: float | None,
        on_progress: ProgressCallback | None = None,
    ) -> Loaded:
        loaded = expect(self._sup.call("load", fields, timeout, on_progress=on_progress), Loaded)
        self._sup.model = loaded.model
        self._sup.model_fields = commands.without_progress(fields)
        return loaded

    def unload(self, *, timeout: Timeout = USE_DEFAULT) -> bool:
        """Free the model; False if none was loaded."""
        reply = expect(self._sup.call("unload", None, self.settings.timeout(timeout)), Unloaded)
        self._sup.model, self._sup.model_fields = None, None
        return reply.was_loaded

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
        """Stream a completion of ``prompt``.

        With ``progress=True`` the stream also yields the worker's
        :class:`~protocol.replies.ProgressEvent` s (stage ``prefill``: prompt
        tokens ``done`` of ``total``), in order before the tokens; a
        ``Stream[Token | ProgressEvent]``. Without it, only ``Token`` s.
        """
        fields = commands.generate_fields(
            prompt,
            commands.sampling_fields(sampling),
            cache_key=cache_key,
            progress=progress,
            extra=extra,
        )
        return self._sup.stream("generate", fields, self.settings.timeout(timeout))

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
        """Stream the answer to ``messages`` (OpenAI-style role/content dicts);
        ``progress`` as for :meth:`generate`."""
        fields = commands.chat_fields(
            messages,
            commands.sampling_fields(sampling),
            chat_template_kwargs=chat_template_kwargs,
            tools=tools,
            cache_key=cache_key,
            progress=progress,
            extra=extra,
        )
        return self._sup.stream("chat", fields, self.settings.timeout(timeout))

    def info(self, *, timeout: Timeout = USE_DEFAULT) -> InfoReply:
        """The loaded model's figures and the worker's memory."""
        return expect(self._sup.call("info", None, self.settings.timeout(timeout)), InfoReply)

    def tokenize(
        self, text: str, *, add_special_tokens: bool = True, timeout: Timeout = USE_DEFAULT
    ) -> tuple[int, ...]:
        fields = commands.tokenize_fields(text, add_special_tokens=add_special_tokens)
        reply = self._sup.call("tokenize", fields, self.settings.timeout(timeout))
        return expect(reply, TokensReply).tokens

    def detokenize(self, tokens: Sequence[int], *, timeout: Timeout = USE_DEFAULT) -> str:
        fields = commands.detokenize_fields(tokens)
        reply = self._sup.call("detokenize", fields, self.settings.timeout(timeout))
        return expect(reply, TextReply).text

    def inspect(
        self,
        prompt: str,
        *,
        directory: str | os.PathLike[str] | None = None,
        timeout: Timeout = USE_DEFAULT,
    ) -> AttentionFacts:
        """Write each layer's attention queries and keys for ``prompt`` into
        ``directory`` (a new temporary one when None); see docs/protocol.md."""
        fields = commands.inspect_fields(prompt, directory)
        reply = self._sup.call("inspect", fields, self.settings.timeout(timeout))
        return expect(reply, Inspected).attention

    def ping(self, *, timeout: Timeout = USE_DEFAULT) -> float:
        """Round trip to the worker, in seconds."""
        started = time.perf_counter()
        expect(self._sup.call("ping", None, self.settings.timeout(timeout)), Pong)
        return time.perf_counter() - started

    def stats(self) -> WorkerStats:
        """RSS and CPU of the worker process, and its MLX memory (None without a model)."""
        return self._sup.stats()

    # -- closing ------------------------------------------------------------------------

    def close(self) -> None:
        """Quit the worker (then SIGTERM, then SIGKILL, each after its timeout).

        Streams still running end with ``finish_reason == "cancelled"`` or
        :class:`WorkerClosed`. Idempotent; also run on exit from ``with``, by
        a finalizer, and at interpreter exit.
        """
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self) -> Worker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        child = self._sup.child
        where = f"pid={child.pid}" if child is not None else "not started"
        state = " closed" if self.closed else ""
        return f"<Worker {where}{state} {' '.join(self.settings.command)!r}>"
