"""Start-up: fast, and no MLX anywhere in the mock's process."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from tests.mock_worker.harness import ROOT, MockWorker, worker_env

pytestmark = pytest.mark.timeout(20)

# A module name in a line of ``-X importtime`` output: "import time: 12 | 34 |   mlx.core".
HEAVY = re.compile(r"\|\s+(mlx|mlx_lm|mlx_vlm|numpy|transformers|torch)(\.|\s*$)", re.M)


def test_hello_is_fast() -> None:
    with MockWorker() as worker:
        worker.send({"cmd": "hello", "id": 1})
        hello = worker.read()
        elapsed = time.perf_counter() - worker.started
        assert hello["type"] == "hello" and hello["id"] == 1 and hello["model"] is None
        assert hello["pid"] == worker.proc.pid
        assert elapsed < 1.0, f"hello took {elapsed:.3f}s"


def test_a_whole_session_imports_no_mlx() -> None:
    """-X importtime lists every module the child imports, on stderr."""
    with MockWorker(python_flags=["-X", "importtime"]) as worker:
        worker.load()
        worker.request({"cmd": "generate", "id": "g", "prompt": "a b", "max_tokens": 3})
        worker.request({"cmd": "chat", "id": "c", "messages": [{"role": "user", "content": "hi"}]})
        worker.call({"cmd": "tokenize", "id": "t", "text": "hi"})
        worker.send({"cmd": "quit"})
        assert worker.wait() == 0
        worker.close()
        imported = worker.stderr
        assert "mock_worker.engine" in imported
        assert "bridge.loop.server" in imported
        assert not HEAVY.search(imported), HEAVY.findall(imported)


def test_help_imports_nothing_heavy_and_lists_the_fault_flags() -> None:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "mock_worker", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env=worker_env(),
        cwd=ROOT,
        timeout=15,
    )
    assert not HEAVY.search(done.stderr), HEAVY.findall(done.stderr)
    for flag in (
        "--model",
        "--log-level",
        "--max-line-bytes",
        "--max-queue",
        "--token-delay",
        "--hello-delay",
        "--crash-after",
        "--exit-code",
        "--hang-after",
        "--garbage-after",
        "--stderr-flood",
        "--fail-load",
        "--ignore-cancel",
        "--quit-silently",
    ):
        assert flag in done.stdout


def test_start_up_imports_no_psutil() -> None:
    """psutil is imported only when ``info`` asks for memory figures."""
    with MockWorker(python_flags=["-X", "importtime"]) as worker:
        worker.load()
        worker.call({"cmd": "ping", "id": 1})
        worker.send({"cmd": "quit"})
        assert worker.wait() == 0
        worker.close()
        assert "psutil" not in worker.stderr


def test_model_flag_preloads() -> None:
    with MockWorker("--model", "some/model") as worker:
        worker.call({"cmd": "ping", "id": 0})
        info = worker.call({"cmd": "info", "id": 1})
        assert info["type"] == "info" and info["path"] == "some/model"
        assert worker.call({"cmd": "hello", "id": 2})["model"] == "some/model"
