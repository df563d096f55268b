"""Bad input gets an error line naming the problem, and the worker keeps serving."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import WorkerProcess


@pytest.fixture(scope="module")
def worker(tiny_model: Path) -> WorkerProcess:  # type: ignore[misc]
    with WorkerProcess("bridge", ["--max-line-bytes", "4096"]) as w:
        assert w.call({"cmd": "load", "id": 0, "path": str(tiny_model)})["type"] == "loaded"
        yield w


def still_serving(worker: WorkerProcess) -> None:
    assert worker.call({"cmd": "ping", "id": "alive"}) == {
        "type": "pong",
        "id": "alive",
        "ok": True,
    }


@pytest.mark.parametrize(
    ("line", "code", "message"),
    [
        (b"this is not json\n", "invalid_json", "line is not valid JSON"),
        (b"[]\n", "invalid_json", "a request must be a JSON object, got a list"),
        (b'"s"\n', "invalid_json", "a request must be a JSON object, got a string"),
        (b"42\n", "invalid_json", "a request must be a JSON object, got a number"),
        (b'{"cmd":"ping","x":"\xff\xfe"}\n', "invalid_json", "line is not valid UTF-8"),
        (b"{}\n", "invalid_request", "cmd: required"),
        (b'{"cmd":7}\n', "invalid_request", "cmd: must be a string"),
        (b'{"cmd":"fly"}\n', "unknown_command", "cmd: unknown command 'fly'"),
        (b'{"cmd":"ping","id":1.5}\n', "invalid_request", "id: must be a string or an integer"),
        (b'{"cmd":"ping","id":true}\n', "invalid_request", "id: must be a string or an integer"),
    ],
)
def test_malformed_lines(worker: WorkerProcess, line: bytes, code: str, message: str) -> None:
    worker.send(line)
    reply = worker.read()
    assert reply["type"] == "error" and reply["code"] == code
    assert reply["error"].startswith(message), reply["error"]
    still_serving(worker)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"cmd": "generate"}, "prompt: required"),
        ({"cmd": "generate", "prompt": 5}, "prompt: must be a string, got a number"),
        (
            {"cmd": "generate", "prompt": "x", "max_tokens": -1},
            "max_tokens: must be an integer ≥ 1",
        ),
        ({"cmd": "generate", "prompt": "x", "max_tokens": "9"}, "max_tokens: must be an integer"),
        (
            {"cmd": "generate", "prompt": "x", "temperature": -0.5},
            "temperature: must be a number ≥ 0",
        ),
        ({"cmd": "generate", "prompt": "x", "temperature": "hot"}, "temperature: must be a number"),
        ({"cmd": "generate", "prompt": "x", "top_p": 1.5}, "top_p: must be a number from 0 to 1"),
        (
            {"cmd": "generate", "prompt": "x", "logprobs": 99},
            "logprobs: must be an integer from 0 to 20",
        ),
        ({"cmd": "generate", "prompt": "x", "stop": [1]}, "stop[0]: must be a string"),
        (
            {"cmd": "generate", "prompt": "x", "logit_bias": {"a": 1}},
            "logit_bias['a']: keys must be token ids",
        ),
        ({"cmd": "generate", "prompt": "x", "seed": True}, "seed: must be an integer"),
        ({"cmd": "chat", "messages": []}, "messages: must not be empty"),
        ({"cmd": "chat", "messages": [{"content": "x"}]}, "messages[0].role: required"),
        (
            {"cmd": "chat", "messages": [{"role": "user", "content": 5}]},
            "messages[0].content: must be a string or a list",
        ),
        (
            {"cmd": "chat", "messages": [{"role": "user", "content": [{"type": "audio"}]}]},
            "messages[0].content[0].type: must be 'text' or 'image_url'",
        ),
        ({"cmd": "load"}, "path: required"),
        ({"cmd": "load", "path": "/x", "context_len": 0}, "context_len: must be an integer ≥ 1"),
        ({"cmd": "tokenize"}, "text: required"),
        ({"cmd": "detokenize", "tokens": [1, "a"]}, "tokens[1]: must be an integer"),
    ],
)
def test_invalid_fields_are_named(
    worker: WorkerProcess, request_: dict[str, object], message: str
) -> None:
    for rid in ("bad", None):
        request = {**request_, "id": rid} if rid else request_
        reply = worker.call(request)
        assert reply["code"] == "invalid_request", reply
        assert reply["error"].startswith(message), reply["error"]
        assert reply.get("id") == rid
    still_serving(worker)


def test_unknown_fields_are_ignored(worker: WorkerProcess) -> None:
    lines = worker.request(
        {"cmd": "generate", "id": "u", "prompt": "x", "max_tokens": 2, "future_field": {"a": 1}}
    )
    assert lines[-1]["finish_reason"] == "length"


def test_line_over_the_limit(worker: WorkerProcess) -> None:
    worker.send(b'{"cmd":"generate","id":"big","prompt":"' + b"a" * 10000 + b'"}\n')
    reply = worker.read()
    assert reply["code"] == "line_too_long" and "4096" in reply["error"]
    still_serving(worker)


def test_nonexistent_path_and_non_model_directory(worker: WorkerProcess, tmp_path: Path) -> None:
    missing = worker.call({"cmd": "load", "id": 1, "path": "/definitely/not/here"})
    assert missing["code"] == "model_not_found"
    (tmp_path / "notes.txt").write_text("hello")
    not_model = worker.call({"cmd": "load", "id": 2, "path": str(tmp_path)})
    assert not_model["code"] == "load_failed" and "config.json" in not_model["error"]
    uncached = worker.call({"cmd": "load", "id": 3, "path": "nobody/no-such-model"})
    assert uncached["code"] == "model_not_found" and "cache" in uncached["error"]
    (tmp_path / "config.json").write_text('{"model_type": "no_such_arch"}')
    # a valid, empty safetensors file: the checks pass and mlx-lm fails on the architecture
    (tmp_path / "model.safetensors").write_bytes((2).to_bytes(8, "little") + b"{}")
    broken = worker.call({"cmd": "load", "id": 4, "path": str(tmp_path)})
    assert broken["code"] == "load_failed"
    # a failed load leaves no model behind (the old one was freed first)
    assert worker.call({"cmd": "generate", "id": 5, "prompt": "x"})["code"] == "no_model"
    still_serving(worker)


def test_generate_before_load() -> None:
    with WorkerProcess("bridge") as fresh:
        reply = fresh.call({"cmd": "generate", "id": "early", "prompt": "hi"})
        assert reply == {
            "type": "error",
            "id": "early",
            "error": "no model loaded; send load first",
            "code": "no_model",
        }
        assert fresh.call({"cmd": "generate", "prompt": "hi"})["code"] == "no_model"
        still_serving(fresh)
