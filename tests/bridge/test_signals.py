"""SIGTERM and SIGINT are ``quit``; a second signal exits at once (real children)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.harness import Line, WorkerProcess

# A generous bound: the worker's own grace is 0.8 s, and the machine may be loaded.
EXIT_BOUND_S = 5.0


def _terminal_lines(worker: WorkerProcess) -> dict[object, Line]:
    terminal: dict[object, Line] = {}
    while (line := worker.lines.get(timeout=5)) is not None:
        assert isinstance(line, dict), line
        if line["type"] != "token":
            terminal[line["id"]] = line
    return terminal


def _wait_for_stderr(worker: WorkerProcess, text: bytes, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in worker.stderr:
        assert time.monotonic() < deadline, f"no {text!r} on stderr:\n{worker.stderr_text}"
        time.sleep(0.02)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_an_idle_worker_exits_0_quickly(signum: signal.Signals) -> None:
    with WorkerProcess("bridge") as worker:
        assert worker.call({"cmd": "hello", "id": 1})["type"] == "hello"
        sent = time.perf_counter()
        worker.proc.send_signal(signum)
        assert worker.wait(EXIT_BOUND_S + 2) == 0
        assert time.perf_counter() - sent < EXIT_BOUND_S
        assert worker.lines.get(timeout=5) is None  # nothing was in flight: nothing to say
        assert b"Traceback" not in worker.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_generation_ends_every_request_then_exits_0(
    tiny_model: Path, signum: signal.Signals
) -> None:
    with WorkerProcess("bridge") as worker:
        worker.call({"cmd": "load", "id": "l", "path": str(tiny_model)})
        worker.send({"cmd": "generate", "id": "g", "prompt": "x", "max_tokens": 100000})
        worker.send({"cmd": "generate", "id": "queued", "prompt": "y"})
        assert worker.read()["type"] == "token"
        sent = time.perf_counter()
        worker.proc.send_signal(signum)
        assert worker.wait(EXIT_BOUND_S + 2) == 0
        assert time.perf_counter() - sent < EXIT_BOUND_S
        terminal = _terminal_lines(worker)
        assert terminal["g"]["type"] == "done" and terminal["g"]["finish_reason"] == "cancelled"
        assert terminal["queued"]["finish_reason"] == "cancelled"
        assert b"Traceback" not in worker.stderr and b"terminate called" not in worker.stderr


def test_lines_sent_before_the_signal_are_still_answered(tiny_model: Path) -> None:
    with WorkerProcess("bridge") as worker:
        worker.call({"cmd": "load", "id": "l", "path": str(tiny_model)})
        worker.send({"cmd": "generate", "id": "g", "prompt": "x", "max_tokens": 100000})
        assert worker.read()["type"] == "token"
        worker.send(b"".join(b'{"cmd":"tokenize","id":%d,"text":"hi"}\n' % i for i in range(50)))
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.wait(EXIT_BOUND_S + 2) == 0
        terminal = _terminal_lines(worker)
        # every request the worker read got its one terminal line; none is left hanging
        assert terminal["g"]["finish_reason"] == "cancelled"
        answered = [i for i in range(50) if i in terminal]
        assert answered == list(range(len(answered)))


def test_a_second_signal_exits_at_once() -> None:
    # --ignore-quit: the mock stops reading on end of input and then never
    # exits, so only the second signal can end it.
    with WorkerProcess("mock_worker", ["--ignore-quit", "--log-level", "INFO"]) as worker:
        assert worker.call({"cmd": "hello", "id": 1})["type"] == "hello"
        worker.proc.send_signal(signal.SIGTERM)
        _wait_for_stderr(worker, b"SIGTERM: shutting down as on quit")
        time.sleep(0.3)
        assert worker.proc.poll() is None
        sent = time.perf_counter()
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.wait(5) == -signal.SIGTERM
        assert time.perf_counter() - sent < EXIT_BOUND_S
        assert b"SIGTERM again; exiting now" in worker.stderr


def test_a_signal_after_quit_exits_at_once() -> None:
    with WorkerProcess("mock_worker", ["--ignore-quit"]) as worker:
        worker.send({"cmd": "quit", "id": "q"})
        _wait_for_stderr(worker, b"mock fault: ignore_quit")  # the quit was read
        assert worker.proc.poll() is None
        worker.proc.send_signal(signal.SIGINT)
        assert worker.wait(5) == -signal.SIGINT


def test_the_mock_treats_sigterm_as_quit_too() -> None:
    with WorkerProcess("mock_worker") as worker:
        worker.call({"cmd": "load", "id": "l", "path": "mock-model"})
        worker.send({"cmd": "generate", "id": "g", "prompt": "a b", "max_tokens": 100000,
                     "mock": {"token_delay": 0.01}})  # fmt: skip
        assert worker.read()["type"] == "token"
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.wait(EXIT_BOUND_S + 2) == 0
        assert _terminal_lines(worker)["g"]["finish_reason"] == "cancelled"


def test_an_ignored_sigterm_stays_ignored() -> None:
    with WorkerProcess("mock_worker", ["--ignore-sigterm"]) as worker:
        assert worker.call({"cmd": "hello", "id": 1})["type"] == "hello"
        worker.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert worker.call({"cmd": "hello", "id": 2})["type"] == "hello"
