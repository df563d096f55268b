"""Cancel, quit, end of stdin, and many requests in flight at once."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator

import pytest

from tests.mock_worker.harness import Line, MockWorker, decode, text_of, word_id

pytestmark = pytest.mark.timeout(20)

SLOW = {"token_delay": 0.02}


@pytest.fixture
def loaded() -> Iterator[MockWorker]:
    with MockWorker() as w:
        w.load()
        yield w


def test_cancel_by_id_ends_the_running_generation(loaded: MockWorker) -> None:
    loaded.send({"cmd": "generate", "id": "g", "prompt": "a", "max_tokens": 10000, "mock": SLOW})
    assert loaded.read()["type"] == "token"
    loaded.send({"cmd": "cancel", "id": "g"})
    lines = loaded.read_until_terminal("g")
    assert lines[-1]["type"] == "done" and lines[-1]["finish_reason"] == "cancelled"
    assert loaded.quiet_for(0.1)  # cancel itself never gets a reply
    assert loaded.call({"cmd": "ping", "id": 1})["type"] == "pong"


def test_cancel_of_a_queued_request_and_unknown_ids(loaded: MockWorker) -> None:
    loaded.send({"cmd": "generate", "id": "run", "prompt": "a", "max_tokens": 30, "mock": SLOW})
    loaded.send({"cmd": "generate", "id": "wait", "prompt": "b"})
    loaded.send({"cmd": "cancel", "id": "wait"})
    loaded.send({"cmd": "cancel", "id": "nobody"})
    first = loaded.read()
    if first["type"] == "token":  # "run" may already be streaming
        assert first["id"] == "run"
        first = loaded.read()
        while first["type"] == "token":
            first = loaded.read()
    assert first == {**first, "id": "wait", "type": "done", "finish_reason": "cancelled"}
    rest = loaded.read_until_terminal("run")
    assert rest[-1]["finish_reason"] == "length"


def test_legacy_cancel_ends_everything(loaded: MockWorker) -> None:
    loaded.send({"cmd": "generate", "id": 1, "prompt": "a", "max_tokens": 10000, "mock": SLOW})
    loaded.send({"cmd": "generate", "id": 2, "prompt": "b", "max_tokens": 10000, "mock": SLOW})
    assert loaded.read()["id"] == 1
    loaded.send({"cmd": "cancel"})
    terminal = _terminals(loaded, {1, 2})
    assert {rid: t["finish_reason"] for rid, t in terminal.items()} == {
        1: "cancelled",
        2: "cancelled",
    }


def test_legacy_generation_is_cancelled_by_legacy_cancel(loaded: MockWorker) -> None:
    loaded.send({"cmd": "generate", "prompt": "a", "max_tokens": 10000, "mock": SLOW})
    assert loaded.read() == {"type": "token", "token": "a", "token_id": word_id("a")}
    loaded.send({"cmd": "cancel"})
    lines = loaded.read_until_terminal(None)
    assert lines[-1]["done"] is True and lines[-1]["finish_reason"] == "cancelled"


def test_quit_with_id_ends_everything_then_says_bye(loaded: MockWorker) -> None:
    loaded.send({"cmd": "generate", "id": "g", "prompt": "a", "max_tokens": 10000, "mock": SLOW})
    loaded.send({"cmd": "generate", "id": "queued", "prompt": "b"})
    assert loaded.read()["type"] == "token"
    loaded.send({"cmd": "quit", "id": "q"})
    assert loaded.wait() == 0
    lines = [decode(raw) for raw in loaded.rest()]
    terminal = [line for line in lines if line["type"] != "token"]
    assert {t["id"] for t in terminal[:2]} == {"g", "queued"} and len(terminal) == 3
    assert terminal[0]["finish_reason"] == terminal[1]["finish_reason"] == "cancelled"
    assert terminal[-1] == {"type": "bye", "id": "q", "ok": True}


def test_legacy_quit_exits_without_bye(loaded: MockWorker) -> None:
    loaded.send({"cmd": "quit"})
    assert loaded.wait() == 0
    assert loaded.rest() == []


def test_end_of_stdin_is_quit(loaded: MockWorker) -> None:
    loaded.send({"cmd": "generate", "id": "g", "prompt": "a", "max_tokens": 10000, "mock": SLOW})
    assert loaded.read()["type"] == "token"
    loaded.close_stdin()
    assert loaded.wait() == 0
    last = decode(loaded.rest()[-1])
    assert last["id"] == "g" and last["finish_reason"] == "cancelled"


def test_concurrent_requests_are_routed_by_id(loaded: MockWorker) -> None:
    prompts = {f"g{i}": f"word{i} other{i}" for i in range(6)}
    for rid, prompt in prompts.items():
        loaded.send(
            {
                "cmd": "generate",
                "id": rid,
                "prompt": prompt,
                "max_tokens": 5,
                "mock": {"token_delay": 0.005},
            }
        )
        loaded.send({"cmd": "ping", "id": f"p-{rid}"})
    loaded.send({"cmd": "tokenize", "id": 99, "text": "ok"})
    wanted = {*prompts, *(f"p-{rid}" for rid in prompts), 99}
    by_id: dict[object, list[Line]] = defaultdict(list)
    done: set[object] = set()
    deadline = time.monotonic() + 10
    while done != wanted:
        line = loaded.read(max(0.01, deadline - time.monotonic()))
        assert line["id"] in wanted and line["id"] not in done, line
        by_id[line["id"]].append(line)
        if line["type"] != "token":
            done.add(line["id"])
    for rid, prompt in prompts.items():
        a, b = prompt.split()
        assert text_of(by_id[rid]) == f"{a} {b} {a} {b} {a}"
        assert by_id[rid][-1]["finish_reason"] == "length"
        assert by_id[f"p-{rid}"] == [{"type": "pong", "id": f"p-{rid}", "ok": True}]
    assert by_id[99][0]["tokens"] == list(b"ok")


def test_a_duplicate_id_in_flight_is_refused(loaded: MockWorker) -> None:
    loaded.send({"cmd": "generate", "id": "same", "prompt": "a", "max_tokens": 20, "mock": SLOW})
    loaded.send({"cmd": "generate", "id": "same", "prompt": "b"})
    lines = loaded.read_until_terminal("same")
    errors = [line for line in lines if line["type"] == "error"]
    assert errors and errors[0]["code"] == "duplicate_id"


def _terminals(worker: MockWorker, ids: set[object]) -> dict[object, Line]:
    out: dict[object, Line] = {}
    while set(out) != ids:
        line = worker.read()
        if line["type"] != "token":
            out[line["id"]] = line
    return out
