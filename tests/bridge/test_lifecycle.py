"""Start-up, shutdown and stdout hygiene of the real worker process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

from tests.harness import ROOT, WorkerProcess, worker_env


def test_hello_is_answered_before_mlx_finishes_importing() -> None:
    with WorkerProcess("bridge") as worker:
        worker.send({"cmd": "hello", "id": 1})
        hello = worker.read()
        elapsed = time.perf_counter() - worker.started
        assert hello["type"] == "hello"
        assert elapsed < 2.0, f"hello took {elapsed:.3f}s"  # bench/ measures the real figure


def test_help_documents_the_flags() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bridge", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env=worker_env(),
        cwd=ROOT,
    ).stdout
    for flag in ("--model", "--log-level", "--max-line-bytes", "--prefill-step-size"):
        assert flag in out


def _start_long_generation(worker: WorkerProcess, model: Path) -> None:
    worker.call({"cmd": "load", "id": "l", "path": str(model)})
    worker.send({"cmd": "generate", "id": "g", "prompt": "x", "max_tokens": 100000})
    worker.send({"cmd": "generate", "id": "queued", "prompt": "y"})
    assert worker.read()["type"] == "token"


def test_quit_while_generating_ends_every_request_and_exits(tiny_model: Path) -> None:
    with WorkerProcess("bridge") as worker:
        _start_long_generation(worker, tiny_model)
        sent = time.perf_counter()
        worker.send({"cmd": "quit", "id": "q"})
        assert worker.wait(5) == 0
        assert time.perf_counter() - sent < 1.0
        terminal = {}
        while (line := worker.lines.get(timeout=5)) is not None:
            assert isinstance(line, dict)
            if line["type"] != "token":
                terminal[line["id"]] = line
        assert terminal["g"]["finish_reason"] == "cancelled"
        assert terminal["queued"]["finish_reason"] == "cancelled"
        assert list(terminal)[-1] == "q" and terminal["q"]["type"] == "bye"
        assert b"Traceback" not in worker.stderr and b"terminate called" not in worker.stderr


def test_stdin_closed_while_generating_exits(tiny_model: Path) -> None:
    with WorkerProcess("bridge") as worker:
        _start_long_generation(worker, tiny_model)
        sent = time.perf_counter()
        worker.close_stdin()
        assert worker.wait(5) == 0
        assert time.perf_counter() - sent < 1.0


def test_idle_quit_is_clean(tiny_model: Path) -> None:
    with WorkerProcess("bridge") as worker:
        worker.call({"cmd": "load", "id": "l", "path": str(tiny_model)})
        worker.request({"cmd": "generate", "id": "g", "prompt": "x", "max_tokens": 3})
        worker.send({"cmd": "quit"})
        assert worker.wait(5) == 0
        assert worker.lines.get(timeout=5) is None  # legacy quit: no reply
        # the engine thread released MLX's streams: no abort (rc 134) at exit
        assert b"terminate called" not in worker.stderr


HOST = textwrap.dedent(
    """
    import subprocess, sys, time
    worker = subprocess.Popen([sys.executable, "-m", "bridge"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE)
    worker.stdin.write(b'{"cmd":"load","path":"%s"}\\n')
    worker.stdin.write(b'{"cmd":"generate","prompt":"x","max_tokens":100000}\\n')
    worker.stdin.flush()
    worker.stdout.readline(); worker.stdout.readline()
    print(worker.pid, flush=True)
    time.sleep(60)
    """
)


def test_worker_does_not_outlive_a_killed_host(tiny_model: Path) -> None:
    host = subprocess.Popen(
        [sys.executable, "-c", HOST % str(tiny_model)],
        stdout=subprocess.PIPE,
        env=worker_env(),
        cwd=ROOT,
    )
    assert host.stdout is not None
    worker_pid = int(host.stdout.readline())
    assert psutil.pid_exists(worker_pid)
    os.kill(host.pid, signal.SIGKILL)
    host.wait(5)
    host.stdout.close()
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            if psutil.Process(worker_pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    else:
        raise AssertionError("worker outlived its host by more than 2 s")


NOISY = textwrap.dedent(
    """
    import os, threading, time
    def noise():
        while True:
            print("library chatter on stdout", flush=True)
            os.write(1, b"raw fd 1 chatter\\n")
            time.sleep(0.002)
    threading.Thread(target=noise, daemon=True).start()
    """
)


def test_library_prints_never_reach_the_protocol_stream(tiny_model: Path, tmp_path: Path) -> None:
    """Anything that prints to stdout after start-up (mlx-lm's warnings do) goes to stderr."""
    (tmp_path / "sitecustomize.py").write_text(
        "import builtins, runpy\n"
        "_orig = builtins.__import__\n"
        "def _hook(name, *a, **k):\n"
        "    mod = _orig(name, *a, **k)\n"
        "    if name == 'mlx_lm' and not getattr(builtins, '_noisy', False):\n"
        "        builtins._noisy = True\n"
        f"        exec({NOISY!r}, {{}})\n"
        "    return mod\n"
        "builtins.__import__ = _hook\n"
    )
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    with WorkerProcess("bridge", env=env) as worker:
        assert worker.call({"cmd": "load", "id": 1, "path": str(tiny_model)})["type"] == "loaded"
        lines = worker.request({"cmd": "generate", "id": 2, "prompt": "x", "max_tokens": 50})
        assert len(lines) == 51
        assert all(not raw.startswith((b"library", b"raw fd")) for raw in worker.raw)
    assert b"library chatter on stdout" in worker.stderr
    assert b"raw fd 1 chatter" in worker.stderr
