"""A real worker child process for tests: send JSON, read lines with timeouts.

Every line the worker writes is decoded and, when ``tests/schema_check.py``
is present, validated against ``docs/protocol.schema.json``.
"""

from __future__ import annotations

import os
import queue
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson

from protocol.replies import NON_TERMINAL_TYPES
from supervisor.settings import module_command
from tests.schema_check import validate_reply

ROOT = Path(__file__).resolve().parent.parent
Line = dict[str, Any]
# Lines that do not end a request (protocol.replies.NON_TERMINAL_TYPES).
NON_TERMINAL = NON_TERMINAL_TYPES


def worker_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


class WorkerProcess:
    """``python -P -m MODULE ARGS`` with its stdout read on a thread."""

    def __init__(
        self,
        module: str = "bridge",
        args: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [*module_command(module), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=worker_env(env),
            cwd=ROOT,
        )
        self.lines: queue.Queue[Line | bytes | None] = queue.Queue()
        self.raw: list[bytes] = []
        self.stderr = bytearray()
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.raw.append(raw)
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError:
                self.lines.put(raw)
                continue
            self.lines.put(obj)
        self.lines.put(None)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        while chunk := os.read(fd, 65536):
            self.stderr += chunk

    # -- I/O -------------------------------------------------------------------------

    def send(self, request: Mapping[str, Any] | bytes) -> None:
        data = request if isinstance(request, bytes) else orjson.dumps(request) + b"\n"
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def read(self, timeout: float = 30.0) -> Line:
        item = self.lines.get(timeout=timeout)
        if item is None:
            raise EOFError(f"worker exited (rc={self.proc.poll()}); stderr:\n{self.stderr_text}")
        if isinstance(item, bytes):
            raise AssertionError(f"worker wrote a non-JSON line: {item!r}")
        validate_reply(item)
        return item

    def read_until_terminal(self, request_id: object = None, timeout: float = 60.0) -> list[Line]:
        """Lines up to and including the terminal line for ``request_id``
        (``None``: the legacy dialect, where lines carry no id)."""
        deadline = time.monotonic() + timeout
        out: list[Line] = []
        while True:
            line = self.read(max(0.01, deadline - time.monotonic()))
            if line.get("id") != request_id:
                raise AssertionError(f"line for another request: {line}")
            out.append(line)
            if line["type"] not in NON_TERMINAL:
                return out

    def collect(
        self, request_ids: Iterable[object], timeout: float = 60.0
    ) -> dict[object, list[Line]]:
        """Every line of requests in flight together, by id, until each has its
        terminal line (lines of other requests are an error)."""
        deadline = time.monotonic() + timeout
        left = set(request_ids)
        out: dict[object, list[Line]] = {rid: [] for rid in left}
        while left:
            line = self.read(max(0.01, deadline - time.monotonic()))
            rid = line.get("id")
            if rid not in out:
                raise AssertionError(f"line for another request: {line}")
            out[rid].append(line)
            if line["type"] not in NON_TERMINAL:
                left.discard(rid)
        return out

    def request(self, request: Mapping[str, Any], timeout: float = 60.0) -> list[Line]:
        self.send(request)
        return self.read_until_terminal(request.get("id"), timeout)

    def call(self, request: Mapping[str, Any], timeout: float = 60.0) -> Line:
        lines = self.request(request, timeout)
        assert len(lines) == 1, lines
        return lines[0]

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def wait(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout)

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", "replace")[-4000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send({"cmd": "quit"})
                self.close_stdin()
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)
        for t in self._threads:
            t.join(5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None and not stream.closed:
                stream.close()

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def text_of(lines: Sequence[Line]) -> str:
    return "".join(line["token"] for line in lines if line["type"] == "token")


def token_ids(lines: Sequence[Line]) -> list[int]:
    return [line["token_id"] for line in lines if line["type"] == "token"]


def alive_after(pids: Sequence[int], seconds: float) -> list[int]:
    """The ``pids`` still running (zombies count as gone) after up to ``seconds``."""
    import psutil

    deadline = time.monotonic() + seconds
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)
