"""The request line limit, as docs/protocol.md's Framing section states it (issue 9, item 8).

The limit excludes the line ending; ``\\r\\n`` is a line ending like ``\\n``;
an overlong line is reported with its length (ending excluded) and is
dropped as it is read, never held whole.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from bridge.loop.stdio import READ_CHUNK, Oversized, read_lines
from tests.harness import WorkerProcess

pytestmark = pytest.mark.timeout(60)

LIMIT = 1000


def lines_of(data: bytes, limit: int = LIMIT) -> list[bytes | int]:
    """What ``read_lines`` yields, with an Oversized as its size."""
    stream = io.BufferedReader(io.BytesIO(data))
    return [x.size if isinstance(x, Oversized) else x for x in read_lines(stream, limit)]


@pytest.mark.parametrize("ending", [b"\n", b"\r\n"])
def test_a_line_at_the_limit_passes_whatever_its_ending(ending: bytes) -> None:
    line = b"x" * LIMIT
    assert lines_of(line + ending + b"next\n") == [line, b"next"]
    assert lines_of(b"next\n" + line) == [b"next", line]  # the last line, without an ending


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b""])
@pytest.mark.parametrize("size", [LIMIT + 1, LIMIT + 2, 5 * READ_CHUNK + 3])
def test_an_overlong_line_is_reported_with_its_length(ending: bytes, size: int) -> None:
    assert lines_of(b"y" * size + ending + b"after\n") == (
        [size, b"after"] if ending else [size + 5]  # without an ending, 'after' is part of it
    )


def test_line_endings_split_across_reads() -> None:
    # a line longer than one read, whose \r and \n fall into different reads
    limit = READ_CHUNK * 2
    line = b"z" * (limit - 1)
    assert lines_of(line + b"\r\n" + b"b\n", limit) == [line, b"b"]
    assert lines_of(b"z" * (limit + 1) + b"\r\n" + b"b\n", limit) == [limit + 1, b"b"]


def test_blank_lines_are_skipped_and_a_last_line_needs_no_newline() -> None:
    assert lines_of(b"\n\r\n  \na\r\n\nb") == [b"a", b"b"]


def test_a_bare_carriage_return_is_part_of_the_line() -> None:
    assert lines_of(b"a\rb\n") == [b"a\rb"]


# -- through a real worker (the mock: the same loop, no MLX to blur the RSS) ------------------


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_worker_limit_excludes_the_line_ending() -> None:
    with WorkerProcess("mock_worker", ["--max-line-bytes", str(LIMIT)]) as worker:
        head = b'{"cmd":"ping","id":"at"}'
        at_limit = head + b" " * (LIMIT - len(head))
        for ending in (b"\n", b"\r\n"):
            worker.send(at_limit + ending)
            assert worker.read() == {"type": "pong", "id": "at", "ok": True}
        worker.send(at_limit + b" \r\n")
        reply = worker.read()
        assert reply["code"] == "line_too_long"
        assert reply["error"].startswith(f"line of {LIMIT + 1} bytes is over the limit of {LIMIT}")
        assert worker.call({"cmd": "ping", "id": 1})["type"] == "pong"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_an_overlong_line_is_not_held_in_memory() -> None:
    """A 48 MiB line over a 16 MiB limit: the worker holds at most the limit
    and one read of it. Before the fix it held the whole limit twice (the
    reader's chunks and their join), and counted the newline in the size."""
    limit, size = 16 * 2**20, 48 * 2**20
    with WorkerProcess("mock_worker", ["--max-line-bytes", str(limit)]) as worker:
        assert worker.call({"cmd": "ping", "id": 0})["type"] == "pong"
        time.sleep(0.2)
        before = peak_rss_bytes(worker.proc.pid)
        assert worker.proc.stdin is not None
        worker.proc.stdin.write(b'{"cmd":"ping","id":1,"pad":"')
        for _ in range(size // 2**20 - 1):
            worker.proc.stdin.write(b"p" * 2**20)
        worker.send(b" " * (2**20 - 30) + b'"}\r\n')
        reply = worker.read(timeout=60)
        grown = peak_rss_bytes(worker.proc.pid) - before
        # generous: the limit plus reads and slack, far below twice the limit
        assert grown < limit * 1.5, f"peak RSS grew by {grown / 2**20:.1f} MiB"
        assert reply["code"] == "line_too_long"
        assert "line of 50331648 bytes" in reply["error"]
        assert worker.call({"cmd": "ping", "id": 2})["type"] == "pong"
