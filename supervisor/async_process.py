"""One worker process for ``AsyncWorker``: the asyncio twin of :mod:`supervisor.process`.

Spawned with ``asyncio.create_subprocess_exec``; stdout is read by one task
in chunks (lines are framed by :class:`~supervisor.core.WorkerCore`, so the
``StreamReader`` limit only bounds buffering; it is set explicitly to the
line limit all the same), stderr is drained by another task. End of stdout
means the worker is gone: its requests fail at once and the owner is told.

Signals are sent with ``os.kill`` while the process is known to be running,
not through ``Popen.send_signal``, whose ``poll()`` could reap the child
behind the back of asyncio's child watcher.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable

from . import forks
from .core import ErrorFactory, WorkerCore
from .errors import WorkerCrashed
from .lifecycle import (
    EXIT_AFTER_EOF_S,
    JOIN_TIMEOUT_S,
    READ_CHUNK,
    STDERR_SETTLE_S,
    exit_error,
    forked_error,
)
from .probe import ProcessProbe
from .settings import Settings
from .stderr import StderrLog

__all__ = ["AsyncChild"]

log = logging.getLogger("supervisor")

OnExit = Callable[["AsyncChild", ErrorFactory], None]


class AsyncChild:
    @classmethod
    async def spawn(cls, settings: Settings, on_exit: OnExit) -> AsyncChild:
        try:
            proc = await asyncio.create_subprocess_exec(
                *settings.argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=settings.child_env(),
                cwd=settings.cwd,
                limit=settings.max_line_bytes,
                start_new_session=True,
            )
        except OSError as exc:
            raise WorkerCrashed(
                f"could not start the worker {settings.command[0]!r}: {exc}", exit_code=None
            ) from exc
        return cls(settings, proc, on_exit)

    def __init__(
        self, settings: Settings, proc: asyncio.subprocess.Process, on_exit: OnExit
    ) -> None:
        self.settings = settings
        self.proc = proc
        self.pid = proc.pid
        self.core = WorkerCore(max_line_bytes=settings.max_line_bytes)
        self._owner_pid = os.getpid()
        self.forked = False  # True in a forked child of the host, whose copy this is
        forks.track(self)
        self.probe = ProcessProbe(self.pid)
        self.stderr = StderrLog(pid=self.pid, tail_bytes=settings.stderr_tail_bytes)
        self.closing = False
        self.kill_reason: str | None = None
        self.kill_error: ErrorFactory | None = None
        self.exited = asyncio.Event()
        self.handled = asyncio.Event()  # set by the owner once it has dealt with the exit
        self._on_exit = on_exit
        self._drain_lock = asyncio.Lock()
        self._stderr_task = asyncio.create_task(
            self._drain_stderr(), name=f"supervisor-stderr-{self.pid}"
        )
        self._stdout_task = asyncio.create_task(
            self._read_stdout(), name=f"supervisor-stdout-{self.pid}"
        )

    @property
    def dying(self) -> bool:
        """Killed by us, or already gone."""
        return self.kill_reason is not None or self.exited.is_set()

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    # -- writing ------------------------------------------------------------------

    def send(self, line: bytes) -> bool:
        """Queue one line for writing; False if stdin is gone."""
        if self.forked:
            return False
        stdin = self.proc.stdin
        if stdin is None or stdin.is_closing() or self.exited.is_set():
            return False
        try:
            stdin.write(line)
        except (OSError, RuntimeError):
            return False
        return True

    async def drain(self) -> None:
        """Wait until the pipe takes what was queued (flow control)."""
        stdin = self.proc.stdin
        if stdin is None or stdin.is_closing():
            return
        try:
            async with self._drain_lock:
                await stdin.drain()
        except (OSError, RuntimeError):
            pass  # the worker is gone; the stdout task reports it

    def _close_stdin(self) -> None:
        stdin = self.proc.stdin
        if stdin is not None and not stdin.is_closing():
            stdin.close()

    # -- the pipe tasks -----------------------------------------------------------------

    async def _drain_stderr(self) -> None:
        reader = self.proc.stderr
        assert reader is not None
        try:
            while chunk := await reader.read(65536):
                self.stderr.feed(chunk)
        except OSError:
            pass
        self.stderr.close()

    async def _read_stdout(self) -> None:
        reader = self.proc.stdout
        assert reader is not None
        core = self.core
        try:
            while chunk := await reader.read(READ_CHUNK):
                for rid in core.feed(chunk):
                    self.send(core.cancel_line(rid))
        except OSError:
            pass
        except Exception:
            log.exception("supervisor: reading worker %d failed; killing it", self.pid)
            self.kill("the supervisor failed to read its output")
        await self._output_ended()

    async def _output_ended(self) -> None:
        self.core.end_of_output()
        returncode = await self._reap()
        try:
            await asyncio.wait_for(asyncio.shield(self._stderr_task), STDERR_SETTLE_S)
        except asyncio.TimeoutError:
            pass
        make_error = self._exit_error(returncode)
        self.core.fail_all(make_error, close=True)
        self._close_stdin()
        self.exited.set()
        try:
            self._on_exit(self, make_error)
        except Exception:
            log.exception("supervisor: handling the exit of worker %d failed", self.pid)
        finally:
            self.handled.set()

    async def _reap(self) -> int:
        if self.closing:
            return await self.proc.wait()
        try:
            return await asyncio.wait_for(self.proc.wait(), EXIT_AFTER_EOF_S)
        except asyncio.TimeoutError:
            log.warning("worker %d closed its stdout but did not exit; killing it", self.pid)
            self.kill("it closed its stdout")
            return await self.proc.wait()

    def _exit_error(self, returncode: int) -> ErrorFactory:
        return exit_error(
            self.pid,
            returncode,
            closing=self.closing,
            kill_reason=self.kill_reason,
            kill_error=self.kill_error,
            stderr_tail=self.stderr.tail,
        )

    # -- ending ---------------------------------------------------------------------

    def forget_after_fork(self) -> None:
        """In a forked child of the host (see :mod:`supervisor.forks`): close
        this process's copies of the three pipes (the pipe files under the
        transports; the event loop is the parent's and is left alone), refuse
        requests, and never write to or signal the worker."""
        self.forked = True
        self.core.after_fork(forked_error(self._owner_pid))
        transport = getattr(self.proc, "_transport", None)
        if not isinstance(transport, asyncio.SubprocessTransport):
            return
        for fd in (0, 1, 2):
            pipe_transport = transport.get_pipe_transport(fd)
            pipe = pipe_transport.get_extra_info("pipe") if pipe_transport is not None else None
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass

    def _signal(self, signum: int) -> None:
        if self.forked:
            return  # the parent's worker: not ours to signal
        if self.proc.returncode is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def kill(self, reason: str, error: ErrorFactory | None = None) -> None:
        """SIGKILL now; the stdout task then reports the death as usual.
        ``error`` is the cause of death; see ``SyncChild.kill``."""
        if self.forked:
            return  # the parent's worker: not ours to kill
        if self.kill_reason is None:
            self.kill_error = error
            self.kill_reason = reason  # from here on ``ready()`` waits for the exit
            if error is not None:
                self.core.fail_all(error, close=True)
        self._signal(signal.SIGKILL)

    async def _wait(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def close(self, quit_line: bytes | None) -> None:
        """The close ladder (quit, SIGTERM, SIGKILL; see ``SyncChild.close``).
        If this coroutine is cancelled on the way, the worker is killed."""
        if self.forked:
            return
        s = self.settings
        self.closing = self.closing or self.proc.returncode is None
        try:
            if self.proc.returncode is None:
                if quit_line is not None:
                    self.send(quit_line)
                self._close_stdin()
                if not await self._wait(s.quit_timeout):
                    log.warning(
                        "worker %d still running %.1f s after quit; sending SIGTERM",
                        self.pid,
                        s.quit_timeout,
                    )
                    self._signal(signal.SIGTERM)
                    if not await self._wait(s.term_timeout):
                        log.warning(
                            "worker %d still running %.1f s after SIGTERM; sending SIGKILL",
                            self.pid,
                            s.term_timeout,
                        )
                        self.kill("it did not exit on quit or SIGTERM")
                        if not await self._wait(s.kill_timeout):
                            log.error("worker %d survived SIGKILL", self.pid)
            self._close_stdin()
            await self._release()
        except BaseException:
            self.kill("closing was interrupted")
            self._close_stdin()
            raise

    async def _release(self) -> None:
        me = asyncio.current_task()
        tasks = [t for t in (self._stdout_task, self._stderr_task) if t is not me]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=JOIN_TIMEOUT_S)
        for task in pending:
            log.error("%s did not end: another process holds the pipe", task.get_name())
            task.cancel()
