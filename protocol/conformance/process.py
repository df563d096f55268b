"""The worker under test: one child process, its three pipes, and a transcript.

Each pipe has its own thread, so that nothing the kit does can block on the
child for longer than a deadline:

- stdout is read line by line into a queue (raw bytes, decoded later);
- stderr is drained all the time (a full stderr pipe would block the worker)
  and its last 16 KiB are kept for failure reports;
- stdin is written from a queue, so that a worker that stops reading (or a
  64 MiB line) cannot wedge the kit; closing stdin is queued behind the
  writes before it.

The child runs in its own session (process group) on POSIX, so ``kill``
also reaches the grandchildren of a wrapper script.
"""

from __future__ import annotations

import collections
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Final

from ..launch import module_command

__all__ = ["WorkerProcess", "imports_from_cwd", "worker_command"]

STDERR_TAIL_BYTES: Final = 16 * 1024
TRANSCRIPT_LINES: Final = 60
_SHOWN_CHARS: Final = 300

# A first word that means "the kit's own interpreter" (see ``worker_command``).
BARE_PYTHONS: Final = ("python", "python3")


def imports_from_cwd(command: Sequence[str]) -> bool:
    """True for ``PYTHON [OPTIONS] -m MODULE`` without ``-P`` or ``-I``: a
    command that a look-alike module in the working directory can hijack."""
    if not command or not re.fullmatch(r"python[0-9.]*", os.path.basename(command[0])):
        return False
    safe = False
    args = iter(command[1:])
    for arg in args:
        if not arg.startswith("-") or arg.startswith("--") or arg == "-":
            return False  # a script (its own directory comes first), or no module at all
        for at, letter in enumerate(arg[1:], start=1):
            if letter in "PI":
                safe = True
            elif letter == "m":
                return not safe
            elif letter == "c":
                return False
            elif letter in "XW":  # takes a value: the rest of this word, or the next one
                if at == len(arg) - 1:
                    next(args, None)
                break
    return False


def worker_command(command: Sequence[str]) -> tuple[str, ...]:
    """The command as the kit runs it: a bare ``python``/``python3`` is this
    interpreter (so ``-- python -m bridge`` tests the environment the kit runs
    in, activated or not), and its ``-m MODULE`` is run safe from the working
    directory. Any other command is run as given."""
    if not command or command[0] not in BARE_PYTHONS:
        return tuple(command)
    rest = tuple(command[1:])
    if len(rest) >= 2 and rest[0] == "-m":
        return module_command(rest[1], *rest[2:])
    return (sys.executable, *rest)


class WorkerProcess:
    """``command`` as a child with piped stdin, stdout and stderr."""

    def __init__(self, command: Sequence[str], *, env: Mapping[str, str]) -> None:
        self.command = tuple(command)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env),
            start_new_session=os.name == "posix",
        )
        self.transcript: collections.deque[str] = collections.deque(maxlen=TRANSCRIPT_LINES)
        self.killed = False
        self._lines: queue.Queue[bytes | None] = queue.Queue()
        self._writes: queue.Queue[bytes | None] = queue.Queue()  # None: close stdin
        self._stderr = bytearray()
        self._stderr_lock = threading.Lock()
        self._eof = False
        self._threads = [
            threading.Thread(target=self._read_stdout, name="kit-stdout", daemon=True),
            threading.Thread(target=self._read_stderr, name="kit-stderr", daemon=True),
            threading.Thread(target=self._write_stdin, name="kit-stdin", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    # -- pipe threads ----------------------------------------------------------------

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        try:
            for raw in self.proc.stdout:
                self._lines.put(raw)
        except (OSError, ValueError):
            pass
        self._lines.put(None)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        try:
            while chunk := os.read(fd, 65536):
                with self._stderr_lock:
                    self._stderr += chunk
                    del self._stderr[:-STDERR_TAIL_BYTES]
        except OSError:
            pass

    def _write_stdin(self) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        while True:
            data = self._writes.get()
            try:
                if data is None:
                    stdin.close()
                    return
                stdin.write(data)
                stdin.flush()
            except (OSError, ValueError):
                return  # the worker is gone or closed its stdin: later writes are moot

    # -- I/O for the session ---------------------------------------------------------

    def write(self, data: bytes, *, note: str | None = None) -> None:
        """Queue ``data`` (one or more whole lines) for the worker's stdin."""
        if data:
            self._writes.put(data)
            self.transcript.append(f"-> {note or shorten(data)}")

    def close_stdin(self) -> None:
        self._writes.put(None)
        self.transcript.append("-> (stdin closed)")

    def read_line(self, deadline: float) -> bytes | None:
        """The next stdout line (with its newline), or None at end of output.

        Raises ``TimeoutError`` when nothing arrives before ``deadline``
        (a ``time.monotonic`` value).
        """
        if self._eof:
            return None
        try:
            raw = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError from None
        if raw is None:
            self._eof = True
            self.transcript.append("<- (end of output)")
            return None
        self.transcript.append(f"<- {shorten(raw)}")
        return raw

    def wait(self, deadline: float) -> int | None:
        """The exit status, or None if the worker is still running at ``deadline``."""
        try:
            return self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return None

    @property
    def stderr_tail(self) -> str:
        with self._stderr_lock:
            return self._stderr.decode("utf-8", "replace")

    # -- ending it ---------------------------------------------------------------------

    def kill(self) -> None:
        """SIGKILL the worker (and its process group). Safe to call at any time."""
        if self.proc.poll() is not None:
            return
        self.killed = True
        try:
            if os.name == "posix":
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                self.proc.kill()
        except (ProcessLookupError, PermissionError):
            self.proc.kill()

    def close(self) -> None:
        """Kill the worker if it still runs, then reap it and join the pipe threads."""
        self.kill()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._writes.put(None)
        for thread in self._threads:
            thread.join(5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def shorten(data: bytes) -> str:
    """One wire line as text for a transcript: long lines cut, size noted."""
    text = data.rstrip(b"\n").decode("utf-8", "backslashreplace")
    if len(text) <= _SHOWN_CHARS:
        return text
    return f"{text[:_SHOWN_CHARS]}... ({len(data):,} bytes)"
