"""Issue 9's edge cases through a real worker: values the worker cannot
represent are refused at the edge, typos are logged (or refused under
``--strict``), and chat roles and content are checked."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.harness import WorkerProcess

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def worker(tiny_model: Path) -> Iterator[WorkerProcess]:
    with WorkerProcess("bridge", ["--log-level", "INFO"]) as w:
        assert w.call({"cmd": "load", "id": 0, "path": str(tiny_model)})["type"] == "loaded"
        yield w


def wait_for_stderr(worker: WorkerProcess, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in worker.stderr_text:
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not on stderr:\n{worker.stderr_text}")
        time.sleep(0.02)
    return worker.stderr_text


def test_context_len_1e20_is_refused_and_the_worker_keeps_serving(
    worker: WorkerProcess, tiny_model: Path
) -> None:
    path = orjson.dumps(str(tiny_model)).decode()
    worker.send(f'{{"cmd":"load","id":1,"path":{path},"context_len":1e20}}\n'.encode())
    reply = worker.read()
    assert reply == {
        "type": "error",
        "id": 1,
        "error": "context_len: must be an integer ≤ 2147483647",
        "code": "invalid_request",
    }
    info = worker.call({"cmd": "info", "id": 2})
    assert info["type"] == "info" and info["path"] == str(tiny_model)
    assert worker.call({"cmd": "ping", "id": 3})["type"] == "pong"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"repetition_context_size": 2**63}, "repetition_context_size: must be an integer"),
        ({"repetition_context_size": 1e30}, "repetition_context_size: must be an integer"),
        ({"max_tokens": 2**63}, "max_tokens: must be an integer"),
        ({"top_k": 2**64 - 1}, "top_k: must be an integer"),
        ({"logit_bias": {"9" * 5000: 1}}, "logit_bias["),
    ],
)
def test_values_beyond_what_mlx_takes_are_invalid_request(
    worker: WorkerProcess, fields: dict[str, object], message: str
) -> None:
    for repetition_penalty in (None, 1.2):
        reply = worker.call(
            {"cmd": "generate", "id": "r", "prompt": "x", "max_tokens": 2, **fields}
            | ({"repetition_penalty": repetition_penalty} if repetition_penalty else {})
        )
        assert reply["code"] == "invalid_request" and reply["error"].startswith(message), reply


def test_nul_in_inspect_dir_is_invalid_request(worker: WorkerProcess, tmp_path: Path) -> None:
    reply = worker.call({"cmd": "inspect", "id": "n", "prompt": "x", "dir": f"{tmp_path}/a\0b"})
    assert reply["code"] == "invalid_request"
    assert reply["error"] == "dir: must not contain a NUL character"


def test_detokenize_refuses_float_token_ids(worker: WorkerProcess) -> None:
    reply = worker.call({"cmd": "detokenize", "id": "d", "tokens": [5.0]})
    assert reply == {
        "type": "error",
        "id": "d",
        "error": "tokens[0]: must be an integer, got a number",
        "code": "invalid_request",
    }
    assert worker.call({"cmd": "detokenize", "id": "d", "tokens": [5]})["type"] == "text"


def test_deep_tool_call_arguments_are_invalid_request(worker: WorkerProcess) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    reply = worker.call(
        {
            "cmd": "chat",
            "id": "deep",
            "messages": [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"type": "function", "function": {"name": "f", "arguments": deep}}
                    ],
                },
            ],
            "max_tokens": 2,
        }
    )
    assert reply["code"] == "invalid_request"
    assert reply["error"].startswith("messages[1].tool_calls[0].function.arguments: nested deeper")


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({"role": "wizard", "content": "hi"}, "messages[0].role: must be one of system, developer"),
        ({"role": "user"}, "messages[0].content: required"),
        ({"role": "tool", "tool_call_id": "c"}, "messages[0].content: required"),
    ],
)
def test_roles_and_content_are_checked(
    worker: WorkerProcess, message: dict[str, object], error: str
) -> None:
    reply = worker.call({"cmd": "chat", "id": "m", "messages": [message], "max_tokens": 2})
    assert reply["code"] == "invalid_request" and reply["error"].startswith(error), reply


def test_developer_role_and_tool_call_without_content_are_served(worker: WorkerProcess) -> None:
    lines = worker.request(
        {
            "cmd": "chat",
            "id": "ok",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": "weather?"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "w", "arguments": "{}"},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            ],
            "max_tokens": 2,
        }
    )
    assert lines[-1]["type"] == "done", lines[-1]


def test_unknown_fields_are_served_and_logged_once_per_request(worker: WorkerProcess) -> None:
    lines = worker.request(
        {
            "cmd": "chat",
            "id": "typo",
            "max_token": 4,
            "messages": [
                {"role": "user", "content": "x", "contnet": "y"},
                {"role": "assistant", "content": "a"},
                {"role": "user", "content": [{"type": "text", "text": "b", "cache_control": {}}]},
            ],
            "max_tokens": 2,
        }
    )
    assert lines[-1]["type"] == "done" and lines[-1]["tokens_generated"] == 2
    stderr = wait_for_stderr(worker, "request 'typo': ignored unknown field(s)")
    (logged,) = [line for line in stderr.splitlines() if "'typo'" in line]
    assert logged.endswith(
        "ignored unknown field(s): max_token, messages[0].contnet, messages[2].content[0].cache_control"
    ), logged


def test_strict_refuses_unknown_fields_naming_them(tiny_model: Path) -> None:
    with WorkerProcess("bridge", ["--strict"]) as strict:
        # go-mlx's own lines have no unknown field
        loaded = strict.call({"cmd": "load", "gpu_layers": -1, "path": str(tiny_model)})
        assert loaded["type"] == "loaded", loaded
        reply = strict.call({"cmd": "generate", "id": "s", "prompt": "x", "max_token": 4})
        assert reply == {
            "type": "error",
            "id": "s",
            "error": "max_token: unknown field (did you mean 'max_tokens'?) "
            "(refused: the worker runs with --strict)",
            "code": "invalid_request",
        }
        lines = strict.request({"cmd": "generate", "id": "g", "prompt": "x", "max_tokens": 2})
        assert lines[-1]["type"] == "done"
        assert strict.call({"cmd": "ping", "id": "p", "extra": 1})["code"] == "invalid_request"


def test_mock_worker_takes_strict_too() -> None:
    with WorkerProcess("mock_worker", ["--strict"]) as mock:
        assert mock.call({"cmd": "ping", "id": 1})["type"] == "pong"
        reply = mock.call({"cmd": "ping", "id": 2, "pnig": 1})
        assert reply["code"] == "invalid_request" and reply["error"].startswith("pnig: unknown")


def test_a_reply_too_big_for_json_still_ends_its_request(
    worker: WorkerProcess, tiny_model: Path, tmp_path: Path
) -> None:
    """A config whose max_position_embeddings is 10**30 puts an integer beyond
    64 bits into the load's reply. The load still gets exactly one terminal
    line (an ``internal`` error for its id, unless the config is refused
    first), and the worker serves on; before, no line came and the next
    ``info`` killed the process."""
    model = tmp_path / "huge-context"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = 10**30  # json writes it; orjson would refuse
    (model / "config.json").write_text(json.dumps(config))
    reply = worker.call({"cmd": "load", "id": "huge", "path": str(model)})
    assert reply["type"] == "error" and reply["code"] in ("internal", "load_failed"), reply
    info = worker.call({"cmd": "info", "id": "after"})
    assert info["type"] == "info" or info["code"] in ("internal", "no_model"), info
    assert worker.call({"cmd": "ping", "id": "alive"})["type"] == "pong"
    assert worker.call({"cmd": "load", "id": "back", "path": str(tiny_model)})["type"] == "loaded"
