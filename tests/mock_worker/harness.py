"""``python -m mock_worker`` as a child process: send requests, read lines with timeouts.

Self-contained on purpose (the mock is what host tests build on). Stdout
lines are read on one thread and stderr is drained on another, so a
flooding worker never blocks; stderr keeps a byte count and a bounded tail.
Every line decoded as a reply is validated against ``docs/protocol.schema.json``.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson

from tests.schema_check import validate_reply

ROOT = Path(__file__).resolve().parents[2]
STDERR_TAIL = 64 * 1024
Line = dict[str, Any]


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


class MockWorker:
    """One ``python -m mock_worker ARGS`` child; a context manager that never leaks it."""

    def __init__(self, *args: str, python_flags: Sequence[str] = ()) -> None:
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, *python_flags, "-m", "mock_worker", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=worker_env(),
            cwd=ROOT,
        )
        self._lines: queue.Queue[bytes | None] = queue.Queue()
        self._stderr_lock = threading.Lock()
        self._stderr_tail = bytearray()
        self.stderr_bytes = 0
        self._threads = [
            threading.Thread(target=self._read_stdout, name="mock-stdout", daemon=True),
            threading.Thread(target=self._read_stderr, name="mock-stderr", daemon=True),
        ]
        for t in self._threads:
            t.start()

    # -- readers ---------------------------------------------------------------------

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self._lines.put(raw)
        self._lines.put(None)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        while chunk := os.read(self.proc.stderr.fileno(), 1 << 16):
            with self._stderr_lock:
                self.stderr_bytes += len(chunk)
                self._stderr_tail += chunk
                del self._stderr_tail[:-STDERR_TAIL]

    @property
    def stderr(self) -> str:
        """The last 64 KiB of stderr."""
        with self._stderr_lock:
            return self._stderr_tail.decode("utf-8", "replace")

    # -- requests and lines ------------------------------------------------------------

    def send(self, request: Mapping[str, Any] | bytes) -> None:
        data = request if isinstance(request, bytes) else orjson.dumps(request) + b"\n"
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def read_raw(self, timeout: float = 5.0) -> bytes | None:
        """The next stdout line as bytes, or None at end of output."""
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(
                f"no line within {timeout}s; stderr:\n{self.stderr[-2000:]}"
            ) from None

    def read(self, timeout: float = 5.0) -> Line:
        raw = self.read_raw(timeout)
        if raw is None:
            raise EOFError(f"worker exited (rc={self.proc.poll()}); stderr:\n{self.stderr[-2000:]}")
        return decode(raw)

    def quiet_for(self, seconds: float) -> bool:
        """True if no stdout line (and no end of output) arrives within ``seconds``."""
        try:
            item = self._lines.get(timeout=seconds)
        except queue.Empty:
            return True
        raise AssertionError(f"expected silence, got {item!r}")

    def lines_within(self, seconds: float) -> list[bytes]:
        """The stdout lines that arrive within ``seconds`` (stops at end of output)."""
        deadline = time.monotonic() + seconds
        out: list[bytes] = []
        while (left := deadline - time.monotonic()) > 0:
            try:
                item = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if item is None:
                self._lines.put(None)
                break
            out.append(item)
        return out

    def read_until_terminal(self, request_id: object = None, timeout: float = 5.0) -> list[Line]:
        """Lines up to and including the terminal line; all must carry ``request_id``
        (``None``: the legacy dialect, lines without ``id``)."""
        deadline = time.monotonic() + timeout
        out: list[Line] = []
        while True:
            line = self.read(max(0.01, deadline - time.monotonic()))
            assert line.get("id") == request_id, f"line for another request: {line}"
            out.append(line)
            if line["type"] not in ("token", "progress"):
                return out

    def read_streams(self, ids: Sequence[object], timeout: float = 10.0) -> list[Line]:
        """Lines, in arrival order, until each of ``ids`` has had its terminal
        line; every line must carry one of them."""
        deadline = time.monotonic() + timeout
        out: list[Line] = []
        open_ids = set(ids)
        while open_ids:
            line = self.read(max(0.01, deadline - time.monotonic()))
            assert line.get("id") in ids, f"line for another request: {line}"
            out.append(line)
            if line["type"] not in ("token", "progress"):
                open_ids.discard(line["id"])
        return out

    def request(self, request: Mapping[str, Any], timeout: float = 5.0) -> list[Line]:
        self.send(request)
        return self.read_until_terminal(request.get("id"), timeout)

    def call(self, request: Mapping[str, Any], timeout: float = 5.0) -> Line:
        lines = self.request(request, timeout)
        assert len(lines) == 1, lines
        return lines[0]

    def load(self, path: str = "mock-model") -> Line:
        loaded = self.call({"cmd": "load", "id": "load", "path": path})
        assert loaded["type"] == "loaded", loaded
        return loaded

    def rest(self, timeout: float = 5.0) -> list[bytes]:
        """Every remaining stdout line until the worker closes its output."""
        deadline = time.monotonic() + timeout
        out: list[bytes] = []
        while (raw := self.read_raw(max(0.01, deadline - time.monotonic()))) is not None:
            out.append(raw)
        return out

    # -- process -------------------------------------------------------------------

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = 5.0) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        for t in self._threads:
            t.join(5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None and not stream.closed:
                try:
                    stream.close()
                except BrokenPipeError:
                    pass

    def __enter__(self) -> MockWorker:
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


def tokens_of(lines: Sequence[Line]) -> list[Line]:
    return [line for line in lines if line["type"] == "token"]


def word_id(word: str) -> int:
    """The mock's token id for a word: stable, 1..31999 (0 is EOS)."""
    return 1 + zlib.crc32(word.encode()) % 31999


def decode(raw: bytes) -> Line:
    """One output line as a reply, checked against the protocol's JSON Schema."""
    line = orjson.loads(raw)
    validate_reply(line)
    assert isinstance(line, dict)
    return line
