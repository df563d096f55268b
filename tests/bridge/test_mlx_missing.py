"""A worker whose Python cannot import MLX: ``mlx_missing`` with an install hint.

The child's import path starts with a directory of stand-ins that fail to
import the way a missing package does (``mlx_lm``, ``mlx``) or the way ``mlx``
without a backend does on Linux (``mlx.core`` cannot find ``libmlx.so``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.harness import ROOT, WorkerProcess

SHIMS = {
    "no mlx_lm": {"mlx_lm/__init__.py": "raise ModuleNotFoundError(\"No module named 'mlx_lm'\")"},
    "no mlx": {"mlx/__init__.py": "raise ModuleNotFoundError(\"No module named 'mlx'\")"},
    "no backend": {
        "mlx/__init__.py": "",
        "mlx/core.py": 'raise ImportError("libmlx.so: cannot open shared object file")',
    },
}


@pytest.mark.parametrize("case", SHIMS)
def test_a_worker_without_mlx_says_what_to_install(
    case: str, tmp_path: Path, tiny_model: Path
) -> None:
    for name, source in SHIMS[case].items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(source + "\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    with WorkerProcess("bridge", env=env) as worker:
        assert worker.call({"cmd": "hello", "id": "h"})["type"] == "hello"
        for request in (
            {"cmd": "load", "id": "l", "path": str(tiny_model)},
            {"cmd": "load", "id": "l2", "path": "/no/such/model"},
            {"cmd": "generate", "id": "g", "prompt": "hi", "max_tokens": 2},
            {"cmd": "chat", "id": "c", "messages": [{"role": "user", "content": "hi"}]},
            {"cmd": "tokenize", "id": "t", "text": "hi"},
            {"cmd": "detokenize", "id": "d", "tokens": [1]},
            {"cmd": "inspect", "id": "i", "prompt": "hi"},
        ):
            reply = worker.call(request)
            assert reply["type"] == "error" and reply["code"] == "mlx_missing", reply
            assert "pip install" in reply["error"] and "mlx-bridge[cpu]" in reply["error"]
        assert worker.call({"cmd": "unload", "id": "u"})["type"] == "unloaded"
        assert worker.call({"cmd": "hello", "id": "h2"})["type"] == "hello"
    # one warning line at warm-up, not a traceback per request
    assert b"Traceback" not in worker.stderr, worker.stderr_text
    assert worker.stderr.count(b"MLX is not usable") == 1, worker.stderr_text


def test_two_mlx_backends_installed_together_are_reported(tmp_path: Path, tiny_model: Path) -> None:
    # mlx-cpu is installed here; a second backend's metadata first on the path
    (tmp_path / "mlx_cuda_13-0.32.4.dist-info").mkdir()
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    with WorkerProcess("bridge", env=env) as worker:
        assert worker.call({"cmd": "load", "id": "l", "path": str(tiny_model)})["type"] == "loaded"
    assert b"MLX backends mlx-cpu, mlx-cuda-13 are all installed" in worker.stderr, (
        worker.stderr_text
    )
    assert b"pip uninstall -y mlx-cpu mlx-cuda-13" in worker.stderr
