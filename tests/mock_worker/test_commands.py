"""Every command in both dialects: addressed (with ``id``) and legacy (without)."""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mock_worker.harness import MockWorker, text_of, tokens_of, word_id

pytestmark = pytest.mark.timeout(20)

IDS = ["addressed", None]


@pytest.fixture
def worker() -> Iterator[MockWorker]:
    """A fresh worker, for tests that change its state."""
    with MockWorker() as w:
        yield w


@pytest.fixture(scope="module")
def loaded() -> Iterator[MockWorker]:
    """One loaded worker shared by the tests that leave it as they found it."""
    with MockWorker() as w:
        w.load()
        yield w


@pytest.fixture(scope="module")
def empty() -> Iterator[MockWorker]:
    """One worker that never loads a model."""
    with MockWorker() as w:
        yield w


def with_id(request: dict[str, object], rid: object) -> dict[str, object]:
    return request if rid is None else {**request, "id": rid}


@pytest.mark.parametrize("rid", IDS)
def test_hello(empty: MockWorker, rid: object) -> None:
    hello = empty.call(with_id({"cmd": "hello"}, rid))
    assert hello["type"] == "hello" and hello.get("id") == rid and hello["ok"] is True
    assert hello["protocol_version"] == 1
    assert hello["versions"]["bridge"]
    assert "generate" in hello["commands"] and "cancel" in hello["commands"]
    assert "inspect" in hello["commands"]
    assert "stop" in hello["sampling_options"]
    assert hello["limits"]["max_queue"] == 256


@pytest.mark.parametrize("rid", IDS)
def test_ping(empty: MockWorker, rid: object) -> None:
    assert empty.call(with_id({"cmd": "ping"}, rid)) == with_id({"type": "pong", "ok": True}, rid)


@pytest.mark.parametrize("rid", IDS)
def test_load_reports_mock_facts(worker: MockWorker, rid: object) -> None:
    loaded = worker.call(with_id({"cmd": "load", "path": "any/where"}, rid))
    assert loaded["type"] == "loaded" and loaded.get("id") == rid and loaded["ok"] is True
    assert loaded["path"] == "any/where" and loaded["model_type"] == "mock"
    assert loaded["vocab_size"] == 32000 and loaded["layers"] == 2
    assert loaded["hidden_size"] == 64 and loaded["dtype"] == "float32"
    assert loaded["context_len"] == 4096 and loaded["load_ms"] >= 0
    again = worker.call(with_id({"cmd": "load", "path": "x", "context_len": 512}, rid))
    assert again["context_len"] == 512 and again["path"] == "x"


@pytest.mark.parametrize("rid", IDS)
def test_unload(worker: MockWorker, rid: object) -> None:
    loaded = worker
    loaded.load()
    first = loaded.call(with_id({"cmd": "unload"}, rid))
    assert first == with_id({"type": "unloaded", "ok": True, "was_loaded": True}, rid)
    assert loaded.call(with_id({"cmd": "unload"}, rid))["was_loaded"] is False
    info = loaded.call(with_id({"cmd": "info"}, rid))
    assert info["type"] == "error" and info["code"] == "no_model"


@pytest.mark.parametrize("rid", IDS)
def test_generate_echoes_the_prompt_words_cyclically(loaded: MockWorker, rid: object) -> None:
    lines = loaded.request(
        with_id({"cmd": "generate", "prompt": "one two  three", "max_tokens": 5}, rid)
    )
    tokens, done = lines[:-1], lines[-1]
    assert [t["token"] for t in tokens] == ["one", " two", " three", " one", " two"]
    assert [t["token_id"] for t in tokens] == [
        word_id(w) for w in ["one", "two", "three", "one", "two"]
    ]
    assert all(t["type"] == "token" and t.get("id") == rid for t in tokens)
    assert done["type"] == "done" and done["done"] is True and done.get("id") == rid
    assert done["finish_reason"] == "length" and done["tokens_generated"] == 5
    assert done["prompt_tokens"] == len(b"one two  three")
    assert done["ttft_ms"] >= 0 and done["generation_tps"] > 0 and done["peak_memory_bytes"] > 0


@pytest.mark.parametrize("rid", IDS)
def test_chat_echoes_the_last_message(loaded: MockWorker, rid: object) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "red"}, {"type": "text", "text": "green"}],
        },
    ]
    lines = loaded.request(with_id({"cmd": "chat", "messages": messages, "max_tokens": 3}, rid))
    assert text_of(lines) == "red green red"
    assert lines[-1]["finish_reason"] == "length" and lines[-1].get("id") == rid


def test_chat_with_an_image_is_refused_like_a_text_model(loaded: MockWorker) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    reply = loaded.call(
        {"cmd": "chat", "id": 1, "messages": [{"role": "user", "content": [image]}]}
    )
    assert reply["code"] == "vision_not_supported"


def test_default_max_tokens_is_256(loaded: MockWorker) -> None:
    lines = loaded.request({"cmd": "generate", "id": 1, "prompt": "w"})
    assert len(tokens_of(lines)) == 256


def test_blank_prompt_stops_at_once(loaded: MockWorker) -> None:
    lines = loaded.request({"cmd": "generate", "id": 1, "prompt": "   "})
    assert lines == [lines[-1]] and lines[-1]["finish_reason"] == "stop"
    empty = loaded.call({"cmd": "generate", "id": 2, "prompt": ""})
    assert empty["code"] == "invalid_request" and "zero tokens" in empty["error"]


def test_eos_after_ends_with_stop(loaded: MockWorker) -> None:
    lines = loaded.request(
        {"cmd": "generate", "id": 1, "prompt": "a b c", "mock": {"eos_after": 2}}
    )
    assert text_of(lines) == "a b"
    assert lines[-1]["finish_reason"] == "stop" and lines[-1]["tokens_generated"] == 2


@pytest.mark.parametrize("rid", IDS)
def test_stop_strings_cut_the_text(loaded: MockWorker, rid: object) -> None:
    request = {
        "cmd": "generate",
        "prompt": "alpha beta gamma delta",
        "stop": ["gam"],
        "max_tokens": 50,
    }
    lines = loaded.request(with_id(request, rid))
    assert text_of(lines) == "alpha beta "
    assert lines[-1]["finish_reason"] == "stop_sequence"


def test_logprobs_have_the_real_shape(loaded: MockWorker) -> None:
    lines = loaded.request(
        {"cmd": "generate", "id": 1, "prompt": "x y z", "max_tokens": 2, "logprobs": 2}
    )
    first = lines[0]
    assert first["logprob"] == 0.0
    assert [t["token"] for t in first["top_logprobs"]] == ["x", "y"]
    assert [t["logprob"] for t in first["top_logprobs"]] == [0.0, -1.0]


@pytest.mark.parametrize("rid", IDS)
def test_info(loaded: MockWorker, rid: object) -> None:
    info = loaded.call(with_id({"cmd": "info"}, rid))
    assert info["type"] == "info" and info.get("id") == rid and info["ok"] is True
    assert info["model_type"] == "mock" and info["path"] == "mock-model"
    memory = info["memory"]
    assert memory["rss_bytes"] > 0 and memory["peak_bytes"] > 0
    assert memory["active_bytes"] == 0 and memory["cache_bytes"] == 0


@pytest.mark.parametrize("rid", IDS)
def test_tokenize_and_detokenize_are_utf8_bytes(loaded: MockWorker, rid: object) -> None:
    tokens = loaded.call(with_id({"cmd": "tokenize", "text": "hé!"}, rid))
    assert tokens == with_id({"type": "tokens", "ok": True, "tokens": list("hé!".encode())}, rid)
    text = loaded.call(with_id({"cmd": "detokenize", "tokens": tokens["tokens"]}, rid))
    assert text == with_id({"type": "text", "ok": True, "text": "hé!"}, rid)


def test_detokenize_rejects_non_bytes_and_bad_utf8(loaded: MockWorker) -> None:
    big = loaded.call({"cmd": "detokenize", "id": 1, "tokens": [104, 300]})
    assert big["code"] == "invalid_request" and big["error"].startswith("tokens[1]:")
    bad = loaded.call({"cmd": "detokenize", "id": 2, "tokens": [0xC3]})
    assert bad["code"] == "invalid_request" and "UTF-8" in bad["error"]


def mock_values(layer: int, count: int, sign: float) -> list[float]:
    """The mock's data as mock_worker/README.md describes it, rounded to float32."""
    exact = [sign * (layer + i / count) for i in range(count)]
    return list(struct.unpack(f"<{count}f", struct.pack(f"<{count}f", *exact)))


@pytest.mark.parametrize("rid", IDS)
def test_inspect_writes_files_of_the_mock_shapes(
    loaded: MockWorker, rid: object, tmp_path: Path
) -> None:
    prompt = "hé, world"
    seq_len = len(prompt.encode())
    target = tmp_path / "sub" / "dir"
    reply = loaded.call(with_id({"cmd": "inspect", "prompt": prompt, "dir": str(target)}, rid))
    assert reply == with_id(
        {
            "type": "inspected",
            "ok": True,
            "dir": str(target),
            "num_layers": 2,
            "num_kv_heads": 2,
            "num_q_heads": 4,
            "seq_len": seq_len,
            "head_dim": 16,
            "architecture": "mock",
        },
        rid,
    )
    names = sorted(p.name for p in target.iterdir())
    assert names == sorted(
        ["inspect.json", "keys_00.bin", "keys_01.bin", "queries_00.bin", "queries_01.bin"]
    )
    for layer in range(2):
        queries = (target / f"queries_{layer:02d}.bin").read_bytes()
        keys = (target / f"keys_{layer:02d}.bin").read_bytes()
        assert len(queries) == 4 * 4 * seq_len * 16 and len(keys) == 4 * 2 * seq_len * 16
        q_count, k_count = len(queries) // 4, len(keys) // 4
        assert list(struct.unpack(f"<{q_count}f", queries)) == mock_values(layer, q_count, 1.0)
        assert list(struct.unpack(f"<{k_count}f", keys)) == mock_values(layer, k_count, -1.0)
    layout = json.loads((target / "inspect.json").read_text())
    assert layout["queries_shape"] == [4, seq_len, 16] and layout["keys_shape"] == [2, seq_len, 16]
    assert layout["architecture"] == "mock" and layout["dtype"] == "float32"


def test_inspect_without_dir_makes_a_temporary_directory(loaded: MockWorker) -> None:
    reply = loaded.call({"cmd": "inspect", "prompt": "ab"})
    directory = Path(reply["dir"])
    try:
        assert "id" not in reply and reply["seq_len"] == 2
        assert directory.parent == Path(tempfile.gettempdir())
        assert directory.name.startswith("mlx-bridge-inspect-")
        assert (directory / "keys_01.bin").stat().st_size == 4 * 2 * 2 * 16
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_inspect_refusals(loaded: MockWorker, tmp_path: Path) -> None:
    empty = loaded.call({"cmd": "inspect", "id": 1, "prompt": ""})
    assert empty["code"] == "invalid_request" and empty["error"] == "prompt: encodes to zero tokens"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    bad_dir = loaded.call({"cmd": "inspect", "id": 2, "prompt": "x", "dir": str(blocker / "d")})
    assert bad_dir["code"] == "invalid_request" and bad_dir["error"].startswith(
        "dir: cannot create"
    )
    missing = loaded.call({"cmd": "inspect", "id": 3})
    assert missing["code"] == "invalid_request" and missing["error"] == "prompt: required"
    assert loaded.call({"cmd": "inspect"})["error"] == "prompt: required"


@pytest.mark.parametrize(
    "request_",
    [
        {"cmd": "generate", "prompt": "x"},
        {"cmd": "chat", "messages": [{"role": "user", "content": "x"}]},
        {"cmd": "tokenize", "text": "x"},
        {"cmd": "detokenize", "tokens": [120]},
        {"cmd": "inspect", "prompt": "x"},
        {"cmd": "info"},
    ],
)
def test_model_commands_need_a_load(empty: MockWorker, request_: dict[str, object]) -> None:
    assert empty.call({**request_, "id": "r"})["code"] == "no_model"
    assert empty.call(request_)["code"] == "no_model"


def test_bad_lines_get_the_real_errors(empty: MockWorker) -> None:
    empty.send(b"{nope\n")
    assert empty.read()["code"] == "invalid_json"
    assert empty.call({"cmd": "dance", "id": 1})["code"] == "unknown_command"
    assert empty.call({"cmd": "generate", "id": 2})["error"] == "prompt: required"


def test_a_bad_mock_option_names_the_field(loaded: MockWorker) -> None:
    unknown = loaded.call({"cmd": "generate", "id": 1, "prompt": "x", "mock": {"explode": True}})
    assert unknown["code"] == "invalid_request" and unknown["error"].startswith("mock.explode:")
    wrong = loaded.call(
        {"cmd": "generate", "id": 2, "prompt": "x", "mock": {"crash_after": "soon"}}
    )
    assert wrong["error"] == "mock.crash_after: must be an integer, got a string"
    code = loaded.call({"cmd": "load", "id": 3, "path": "m", "mock": {"fail_load": "nope"}})
    assert code["code"] == "invalid_request" and code["error"].startswith("mock.fail_load:")
    not_object = loaded.call({"cmd": "generate", "id": 4, "prompt": "x", "mock": 3})
    assert not_object["error"] == "mock: must be an object, got a number"
