"""One worker process for the sync ``Worker``: spawn, pipe threads, close ladder.

``SyncChild`` starts the command with three pipes. Its stdout is read on one
daemon thread (raw ``os.read`` chunks into the :class:`~supervisor.core.WorkerCore`),
its stderr drained on another (into :class:`~supervisor.stderr.StderrLog`),
so a chatty worker never blocks. End of stdout means the worker is gone:
the thread reaps it, fails every request in flight (``WorkerCrashed`` with
the exit code and stderr tail, or ``WorkerClosed`` when the host closed it)
and reports the exit to its owner, all within milliseconds of the death.

The child runs in its own session (``start_new_session``), so a Ctrl-C in
the host's terminal reaches the host, which then closes the worker in order.
If the host dies, the worker's stdin closes and it exits by itself, even if
the host had forked: a forked child closes its copies of the pipes at once
(:mod:`supervisor.forks`, which also says why no ``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from collections.abc import Callable

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows
    fcntl = None  # type: ignore[assignment]

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

__all__ = ["SyncChild"]

log = logging.getLogger("supervisor")

OnExit = Callable[["SyncChild", ErrorFactory], None]
PIPE_BYTES = 1 << 20


def widen_pipe(fd: int) -> None:
    """Ask Linux for a 1 MiB pipe (the default is 64 KiB): fewer, larger reads
    and fewer wake-ups when tokens stream fast. A no-op where unsupported."""
    setsize = getattr(fcntl, "F_SETPIPE_SZ", None) if fcntl is not None else None
    if setsize is None:
        return
    try:
        fcntl.fcntl(fd, setsize, PIPE_BYTES)
    except OSError:
        pass  # over /proc/sys/fs/pipe-max-size: keep the default


class SyncChild:
    def __init__(self, settings: Settings, on_exit: OnExit) -> None:
        self.settings = settings
        self.core = WorkerCore(max_line_bytes=settings.max_line_bytes)
        try:
            self.proc = subprocess.Popen(
                list(settings.argv),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                bufsize=0,
                env=settings.child_env(),
                cwd=settings.cwd,
                close_fds=True,
                start_new_session=True,
            )
        except OSError as exc:
            raise WorkerCrashed(
                f"could not start the worker {settings.command[0]!r}: {exc}", exit_code=None
            ) from exc
        self.pid = self.proc.pid
        self._owner_pid = os.getpid()
        self.forked = False  # True in a forked child of the host, whose copy this is
        forks.track(self)
        assert self.proc.stdout is not None
        widen_pipe(self.proc.stdout.fileno())
        self.probe = ProcessProbe(self.pid)
        self.stderr = StderrLog(pid=self.pid, tail_bytes=settings.stderr_tail_bytes)
        self.closing = False
        self.kill_reason: str | None = None
        self.kill_error: ErrorFactory | None = None
        self.exited = threading.Event()
        self.handled = False  # set by the owner once it has dealt with the exit
        self._on_exit = on_exit
        self._write_lock = threading.Lock()
        self._kill_lock = threading.Lock()
        self._stderr_thread = threading.Thread(
            target=self._drain_stderr, name=f"supervisor-stderr-{self.pid}", daemon=True
        )
        self._stdout_thread = threading.Thread(
            target=self._read_stdout, name=f"supervisor-stdout-{self.pid}", daemon=True
        )
        self._stderr_thread.start()
        self._stdout_thread.start()

    @property
    def dying(self) -> bool:
        """Killed by us, or already gone."""
        return self.kill_reason is not None or self.exited.is_set()

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    # -- writing ------------------------------------------------------------------

    def send(self, line: bytes) -> bool:
        """Write one line; False if the worker's stdin is gone (its death is
        reported by the stdout thread, not here)."""
        if self.forked:
            return False
        with self._write_lock:
            stdin = self.proc.stdin
            if stdin is None or stdin.closed:
                return False
            try:
                view = memoryview(line)
                while view:
                    view = view[stdin.write(view) or 0 :]
            except (OSError, ValueError):
                return False
            return True

    def _close_stdin(self) -> None:
        with self._write_lock:
            stdin = self.proc.stdin
            if stdin is not None and not stdin.closed:
                try:
                    stdin.close()
                except OSError:
                    pass

    # -- the pipe threads ---------------------------------------------------------------

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        try:
            while chunk := os.read(fd, 65536):
                self.stderr.feed(chunk)
        except OSError:
            pass
        self.stderr.close()
        self.proc.stderr.close()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        core = self.core
        try:
            while chunk := os.read(fd, READ_CHUNK):
                for rid in core.feed(chunk):
                    self.send(core.cancel_line(rid))
        except OSError:
            pass
        except Exception:  # a bug of ours: the stream state is unknown, end the worker
            log.exception("supervisor: reading worker %d failed; killing it", self.pid)
            self.kill("the supervisor failed to read its output")
        finally:
            self._output_ended()

    def _output_ended(self) -> None:
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self.core.end_of_output()
        returncode = self._reap()
        self._stderr_thread.join(STDERR_SETTLE_S)
        make_error = self._exit_error(returncode)
        self.core.fail_all(make_error, close=True)
        self.exited.set()
        try:
            self._on_exit(self, make_error)
        except Exception:
            log.exception("supervisor: handling the exit of worker %d failed", self.pid)

    def _reap(self) -> int:
        if self.closing:
            return self.proc.wait()  # the close ladder makes sure it ends
        try:
            return self.proc.wait(EXIT_AFTER_EOF_S)
        except subprocess.TimeoutExpired:
            log.warning("worker %d closed its stdout but did not exit; killing it", self.pid)
            self.kill("it closed its stdout")
            return self.proc.wait()

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

    def kill(self, reason: str, error: ErrorFactory | None = None) -> None:
        """SIGKILL now; the stdout thread then reports the death as usual.

        ``error``, if given, is the cause of death, recorded before the signal
        is sent: the requests in flight fail with it at once, the core refuses
        new ones with it, and the exit is reported with it rather than as a
        crash, so every later request of this worker raises it too."""
        if self.forked:
            return  # the parent's worker: not ours to kill
        with self._kill_lock:
            first = self.kill_reason is None
            if first:
                self.kill_error = error
                self.kill_reason = reason  # from here on ``ready()`` waits for the exit
        if first and error is not None:
            self.core.fail_all(error, close=True)
        try:
            self.proc.kill()
        except OSError:
            pass

    def _wait(self, timeout: float) -> bool:
        """True once the worker has exited. The stdout thread reaps it with a
        blocking ``waitpid`` and sets ``exited`` at once, where ``Popen.wait``
        with a timeout would poll with a backoff of up to 50 ms."""
        if self.exited.wait(timeout):
            return True
        return self.proc.poll() is not None

    def close(self, quit_line: bytes | None) -> None:
        """The close ladder: ``quit`` and end of stdin, wait ``quit_timeout``;
        SIGTERM, wait ``term_timeout``; SIGKILL, wait ``kill_timeout``.
        Then join the pipe threads and close the pipes. Safe to repeat, and
        safe on a worker that has already exited."""
        if self.forked:
            return
        s = self.settings
        self.closing = self.closing or self.proc.returncode is None
        try:
            if self.proc.poll() is None:
                if quit_line is not None:
                    self.send(quit_line)
                self._close_stdin()
                if not self._wait(s.quit_timeout):
                    log.warning(
                        "worker %d still running %.1f s after quit; sending SIGTERM",
                        self.pid,
                        s.quit_timeout,
                    )
                    self._signal(signal.SIGTERM)
                    if not self._wait(s.term_timeout):
                        log.warning(
                            "worker %d still running %.1f s after SIGTERM; sending SIGKILL",
                            self.pid,
                            s.term_timeout,
                        )
                        self.kill("it did not exit on quit or SIGTERM")
                        if not self._wait(s.kill_timeout):
                            log.error("worker %d survived SIGKILL", self.pid)
        except BaseException:
            self.kill("closing was interrupted")  # never leave it behind
            raise
        finally:
            self._close_stdin()
            self._release()

    def forget_after_fork(self) -> None:
        """In a forked child of the host (see :mod:`supervisor.forks`):
        close this process's copies of the three pipes, refuse requests, and
        never write to, signal or wait for the worker, which is the parent's."""
        self.forked = True
        self.core.after_fork(forked_error(self._owner_pid))
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass

    def _signal(self, signum: int) -> None:
        try:
            self.proc.send_signal(signum)
        except OSError:
            pass

    def _release(self) -> None:
        me = threading.current_thread()
        for thread in (self._stdout_thread, self._stderr_thread):
            if thread is not me:
                thread.join(JOIN_TIMEOUT_S)
                if thread.is_alive():
                    log.error("%s did not end: another process holds the pipe", thread.name)
