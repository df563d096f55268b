"""The close ladder, rung by rung, and what happens when the host goes away."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from supervisor import Worker
from tests.supervisor.conftest import ENV, MOCK, ROOT, mock_worker

pytestmark = pytest.mark.timeout(30)


def test_idle_close_takes_the_first_rung_quickly() -> None:
    w = mock_worker()
    started = time.perf_counter()
    w.close()
    elapsed = time.perf_counter() - started
    assert w.returncode == 0
    assert elapsed < 0.5, f"close took {elapsed * 1000:.0f} ms"  # bench/ measures the real figure


def test_a_worker_that_ignores_quit_gets_sigterm() -> None:
    w = mock_worker("--ignore-quit", quit_timeout=0.3, term_timeout=2.0)
    started = time.perf_counter()
    w.close()
    assert w.returncode == -signal.SIGTERM
    assert 0.3 <= time.perf_counter() - started < 1.5


def test_a_worker_that_ignores_quit_and_sigterm_gets_sigkill() -> None:
    w = mock_worker("--ignore-quit", "--ignore-sigterm", quit_timeout=0.3, term_timeout=0.3)
    started = time.perf_counter()
    w.close()
    assert w.returncode == -signal.SIGKILL
    assert 0.6 <= time.perf_counter() - started < 2.0


def test_an_inline_worker_that_ignores_quit_and_sigterm_gets_sigkill() -> None:
    # The same ladder against a minimal hand-written worker: it answers hello,
    # then reads and ignores everything, and never exits on its own.
    source = textwrap.dedent(
        """
        import json, signal, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        req = json.loads(sys.stdin.readline())
        hello = {"type": "hello", "id": req["id"], "protocol_version": 1, "versions": {},
                 "commands": [], "sampling_options": [], "limits": {}, "pid": 0}
        print(json.dumps(hello), flush=True)
        for line in sys.stdin:
            pass
        while True:
            time.sleep(1)
        """
    )
    w = Worker([sys.executable, "-c", source], quit_timeout=0.2, term_timeout=0.2)
    w.close()
    assert w.returncode == -signal.SIGKILL


def test_close_is_idempotent_and_run_by_the_finalizer() -> None:
    w = mock_worker()
    pid = w.pid
    proc = psutil.Process(pid)
    del w
    gc.collect()
    assert not proc.is_running()


def _host(body: str) -> subprocess.Popen[str]:
    """A Python host process that drives a mock worker."""
    source = textwrap.dedent(
        f"""
        import sys
        from supervisor import Worker
        w = Worker({list(MOCK)!r}, model="m", cwd={str(ROOT)!r}, env={ENV!r})
        """
    ) + textwrap.dedent(body)
    return subprocess.Popen(
        [sys.executable, "-c", source],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **ENV},
        cwd=ROOT,
    )


def _gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def test_worker_exits_within_2_s_when_the_host_is_killed_while_streaming() -> None:
    host = _host(
        """
        stream = w.generate("a", max_tokens=1_000_000, extra={"mock": {"token_delay": 0.001}})
        next(stream)
        print(w.pid, flush=True)
        for token in stream:
            pass
        """
    )
    try:
        assert host.stdout is not None
        worker_pid = int(host.stdout.readline())
        assert not _gone(worker_pid)
        host.send_signal(signal.SIGKILL)
        host.wait(5)
        killed = time.monotonic()
        while not _gone(worker_pid) and time.monotonic() - killed < 2.0:
            time.sleep(0.01)
        assert _gone(worker_pid), "the worker outlived its host by 2 s"
    finally:
        host.kill()
        host.wait()
        if host.stdout is not None:
            host.stdout.close()


def test_worker_is_closed_at_interpreter_exit() -> None:
    host = _host(
        """
        print(w.pid, flush=True)
        """
    )
    try:
        assert host.stdout is not None
        worker_pid = int(host.stdout.readline())
        assert host.wait(10) == 0
        assert _gone(worker_pid)
    finally:
        host.kill()
        host.wait()
        if host.stdout is not None:
            host.stdout.close()
