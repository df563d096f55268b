"""SIGTERM and SIGINT mean ``quit``; a second one means now.

Orchestrators (systemd, Kubernetes, a supervisor's close ladder) stop a
process with SIGTERM, and a terminal sends SIGINT. The first of either ends
the request loop as end of input would: every request in flight gets its
terminal line and the worker exits 0 (within ``EXIT_GRACE_S``). A signal
that arrives once the worker is already stopping (a second signal, or one
after ``quit``) ends the process at once, killed by that signal.

The stdin thread is the main thread, blocked in ``read``. Python runs a
signal handler on the main thread, between bytecodes, so the handler cannot
simply return: the interrupted ``read`` would be retried (PEP 475) and block
again. Instead the handler points the stdin fd at ``/dev/null``: the
retried read sees end of input, and the lines already buffered are still
read and answered, so none is lost. The engine thread (and every thread it
starts, MLX's included) is created with both signals blocked, so the kernel
always delivers them to the main thread, where they interrupt that ``read``.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import BinaryIO

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

# What a handler may replace: the defaults. A disposition someone chose
# (mock_worker --ignore-sigterm sets SIG_IGN; an embedding host may have its
# own) is left alone.
_DEFAULTS: dict[int, object] = {
    signal.SIGTERM: signal.SIG_DFL,
    signal.SIGINT: signal.default_int_handler,
}


class StopSignals:
    """Turns the first SIGTERM/SIGINT into end of input on ``stdin``."""

    def __init__(self, stdin: BinaryIO) -> None:
        self._stdin = stdin
        self._installed: list[int] = []
        self._stopping = False
        self.received: int | None = None

    def install(self) -> bool:
        """Install the handlers; only on the main thread, over default dispositions."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) is _DEFAULTS[signum]:
                signal.signal(signum, self._handle)
                self._installed.append(signum)
        return bool(self._installed)

    @contextmanager
    def blocked(self) -> Iterator[None]:
        """Threads started inside this block inherit the stop signals blocked."""
        if not self._installed or not hasattr(signal, "pthread_sigmask"):  # Windows has none
            yield
            return
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, self._installed)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def stopping(self) -> None:
        """The request loop has ended: from now on a signal exits at once."""
        self._stopping = True

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._stopping or self.received is not None:
            _die_by(signum)
        self.received = signum
        try:
            fd = self._stdin.fileno()
        except (OSError, ValueError):
            return  # not a real file (a test's BytesIO): the loop checks ``received``
        null = os.open(os.devnull, os.O_RDONLY)
        try:
            os.dup2(null, fd)
        finally:
            os.close(null)


def _die_by(signum: int) -> None:
    """End the process now, with the status of being killed by ``signum``."""
    os.write(2, f"bridge: {signal.Signals(signum).name} again; exiting now\n".encode())
    signal.signal(signum, signal.SIG_DFL)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)  # only if the signal did not end the process
