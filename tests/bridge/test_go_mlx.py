"""The exact exchange go-mlx's Go backend performs, byte for byte as it sends it.

go-mlx marshals with Go's encoding/json: sorted keys, compact, and ``<``,
``>``, ``&`` escaped as ``\\u003c`` etc. It reads one line for ``load``; in a
stream, a line with ``done`` ends it, an ``error`` line ends it, and any other
line is a token. ``cancel`` and ``quit`` must never be answered.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tests.harness import WorkerProcess


def go_marshal(obj: dict[str, Any]) -> bytes:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return text.encode() + b"\n"


def go_stream(worker: WorkerProcess) -> tuple[list[str], dict[str, Any]]:
    """Read a stream the way go-mlx does; every non-terminal line must be a token."""
    tokens: list[str] = []
    while True:
        line = worker.read()
        assert "id" not in line
        if "done" in line or "error" in line:
            return tokens, line
        assert set(line) >= {"token", "token_id"}, f"go-mlx would take {line} for a token"
        tokens.append(line["token"])


def test_go_mlx_session(tiny_model: Path) -> None:
    with WorkerProcess("bridge") as worker:
        worker.send(go_marshal({"cmd": "load", "gpu_layers": -1, "path": str(tiny_model)}))
        loaded = worker.read()
        assert loaded["ok"] is True and "error" not in loaded
        assert loaded["model_type"] == "qwen3" and loaded["vocab_size"] >= 2048

        worker.send(
            go_marshal(
                {
                    "cmd": "generate",
                    "max_tokens": 8,
                    "prompt": "<b>&",
                    "temperature": 0.8,
                    "top_k": 40,
                    "top_p": 0.95,
                    "repeat_penalty": 1.1,
                }
            )
        )
        tokens, done = go_stream(worker)
        assert len(tokens) == 8 and done["done"] is True and done["tokens_generated"] == 8

        messages = [{"content": "Hi <there> & you", "role": "user"}]
        worker.send(go_marshal({"cmd": "chat", "max_tokens": 256, "messages": messages}))
        tokens, done = go_stream(worker)
        assert len(tokens) == 256 and done["tokens_generated"] == 256

        worker.send(go_marshal({"cmd": "info"}))
        info = worker.read()
        assert info["model_type"] == "qwen3" and info["vocab_size"] >= 2048
        assert info["layers"] == 2 and info["hidden_size"] == 64  # go-mlx's bridge says 0

        # the caller stops iterating: go-mlx sends cancel, then drains to done
        worker.send(go_marshal({"cmd": "generate", "max_tokens": 100000, "prompt": "x"}))
        assert "token" in worker.read()
        worker.send(go_marshal({"cmd": "cancel"}))
        _, done = go_stream(worker)
        assert done["done"] is True and done["finish_reason"] == "cancelled"

        # cancel after done, and with nothing running, gets no reply at all
        worker.send(go_marshal({"cmd": "cancel"}))
        worker.send(go_marshal({"cmd": "info"}))
        assert worker.read()["layers"] == 2

        worker.send(go_marshal({"cmd": "quit"}))
        worker.close_stdin()
        started = time.perf_counter()
        assert worker.wait(2) == 0  # go-mlx SIGKILLs after 2 s and reports rc != 0
        assert time.perf_counter() - started < 2
        assert worker.lines.get(timeout=5) is None, "quit must not be answered"


def test_go_mlx_error_lines_end_the_stream(tiny_model: Path) -> None:
    with WorkerProcess("bridge") as worker:
        worker.send(go_marshal({"cmd": "generate", "max_tokens": 256, "prompt": "x"}))
        tokens, end = go_stream(worker)
        assert tokens == [] and isinstance(end["error"], str) and end["code"] == "no_model"
        worker.send(go_marshal({"cmd": "load", "gpu_layers": -1, "path": "/nonexistent/model"}))
        assert "error" in worker.read()
