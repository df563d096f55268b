"""Fixtures for the supervisor tests: real children, and a check that none leak.

Every test runs under ``no_leaks``: afterwards this process must have no
child process (zombies included), no thread and no file descriptor that it
did not have before (a short grace lets exiting threads finish).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from supervisor import AsyncWorker, Worker

ROOT = Path(__file__).resolve().parents[2]
MOCK = (sys.executable, "-m", "mock_worker")
ENV = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
# Quick ladders and graces, so fault tests stay fast.
FAST: dict[str, Any] = {
    "start_timeout": 10.0,
    "cancel_grace": 0.5,
    "quit_timeout": 1.0,
    "term_timeout": 1.0,
}


def _options(options: dict[str, Any]) -> dict[str, Any]:
    env = ENV | options.pop("env", {})
    return FAST | {"env": env, "cwd": ROOT} | options


def mock_worker(*flags: str, model: str | None = "mock-model", **options: Any) -> Worker:
    """A sync ``Worker`` over ``python -m mock_worker FLAGS``, model loaded."""
    return Worker([*MOCK, *flags], model=model, **_options(options))


def async_mock_worker(*flags: str, model: str | None = "mock-model", **options: Any) -> AsyncWorker:
    """The same as an ``AsyncWorker`` (not started)."""
    return AsyncWorker([*MOCK, *flags], model=model, **_options(options))


def python_worker(source: str, **options: Any) -> Worker:
    """A ``Worker`` over an inline Python program (for faults the mock lacks)."""
    return Worker([sys.executable, "-c", source], **_options(options))


def _fds() -> dict[str, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return out


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    me = psutil.Process()
    threads = set(threading.enumerate())
    fds = _fds()
    yield
    deadline = time.monotonic() + 3.0
    while True:
        children = me.children(recursive=True)
        new_threads = [t for t in threading.enumerate() if t not in threads]
        new_fds = {fd: target for fd, target in _fds().items() if fds.get(fd) != target}
        if not (children or new_threads or new_fds) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert not children, f"child processes left: {children}"
    assert not new_threads, f"threads left: {new_threads}"
    assert not new_fds, f"file descriptors left: {new_fds}"
