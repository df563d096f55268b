"""Cancel by id and cancel-all, while queued, in prefill and in decode."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.harness import WorkerProcess, token_ids

LONG_PROMPT = Path(os.__file__).read_text()[:10000]  # about 3,900 tokens, within the 4,096 context


def test_cancel_during_decode_by_id(loaded_worker: WorkerProcess) -> None:
    loaded_worker.send({"cmd": "generate", "id": "long", "prompt": "x", "max_tokens": 100000})
    for _ in range(3):
        assert loaded_worker.read()["type"] == "token"
    # info, ping and hello are answered mid-generation, between its tokens
    for probe in ({"cmd": "info", "id": "i"}, {"cmd": "ping", "id": "p"}):
        loaded_worker.send(probe)
        while (line := loaded_worker.read())["id"] == "long":
            pass
        assert line["id"] == probe["id"] and line["type"] in ("info", "pong")
    sent = time.perf_counter()
    loaded_worker.send({"cmd": "cancel", "id": "long"})
    lines = loaded_worker.read_until_terminal("long", timeout=5)
    elapsed = time.perf_counter() - sent
    done = lines[-1]
    assert done["type"] == "done" and done["finish_reason"] == "cancelled"
    assert done["tokens_generated"] >= 3
    assert elapsed < 1.0
    # the worker keeps serving, and the next greedy run is unaffected
    assert loaded_worker.call({"cmd": "ping", "id": "after"})["type"] == "pong"


def test_cancel_during_prefill(loaded_worker: WorkerProcess) -> None:
    """A long prompt takes seconds to prefill on this CPU; cancel lands between chunks."""
    loaded_worker.send({"cmd": "generate", "id": "pf", "prompt": LONG_PROMPT, "max_tokens": 5})
    time.sleep(0.3)
    sent = time.perf_counter()
    loaded_worker.send({"cmd": "cancel", "id": "pf"})
    done = loaded_worker.read_until_terminal("pf")
    elapsed = time.perf_counter() - sent
    assert done == [done[-1]], "no token may come out of a cancelled prefill"
    assert done[-1]["finish_reason"] == "cancelled"
    assert done[-1]["tokens_generated"] == 0 and done[-1]["ttft_ms"] is None
    assert done[-1]["prompt_tokens"] > 3000
    assert elapsed < 1.0, f"cancel took {elapsed:.3f}s"


def test_cancel_of_one_leaves_the_other(loaded_worker: WorkerProcess) -> None:
    loaded_worker.send({"cmd": "generate", "id": "a", "prompt": "x", "max_tokens": 200})
    loaded_worker.send({"cmd": "generate", "id": "b", "prompt": "y", "max_tokens": 200})
    loaded_worker.send({"cmd": "cancel", "id": "b"})
    seen = loaded_worker.collect(["a", "b"])
    b = seen["b"]
    assert b[-1]["finish_reason"] == "cancelled" and b[-1]["tokens_generated"] < 200
    assert seen["a"][-1]["finish_reason"] == "length" and len(seen["a"]) == 201


def test_cancel_without_id_cancels_everything(loaded_worker: WorkerProcess) -> None:
    """Three streams decode together; ``cancel`` without an id ends all of them."""
    for rid in ("c1", "c2", "c3"):
        loaded_worker.send({"cmd": "generate", "id": rid, "prompt": "x", "max_tokens": 100000})
    started: set[object] = set()
    while len(started) < 3:
        line = loaded_worker.read()
        assert line["type"] == "token"
        started.add(line["id"])
    loaded_worker.send({"cmd": "cancel"})
    terminal: dict[object, dict[str, object]] = {}
    while len(terminal) < 3:
        line = loaded_worker.read(timeout=5)
        if line["type"] != "token":
            assert line["id"] not in terminal, "two terminal lines for one request"
            terminal[line["id"]] = line
    assert {terminal[r]["finish_reason"] for r in ("c1", "c2", "c3")} == {"cancelled"}
    assert loaded_worker.call({"cmd": "ping", "id": "after"})["type"] == "pong"


def test_cancel_of_unknown_or_finished_id_gets_no_reply(loaded_worker: WorkerProcess) -> None:
    loaded_worker.request({"cmd": "generate", "id": "fin", "prompt": "x", "max_tokens": 2})
    loaded_worker.send({"cmd": "cancel", "id": "fin"})
    loaded_worker.send({"cmd": "cancel", "id": "never-sent"})
    loaded_worker.send({"cmd": "cancel"})
    assert loaded_worker.call({"cmd": "ping", "id": "next"})["type"] == "pong"


def test_duplicate_id_in_flight_is_refused(loaded_worker: WorkerProcess) -> None:
    loaded_worker.send({"cmd": "generate", "id": "dup", "prompt": "x", "max_tokens": 100000})
    assert loaded_worker.read()["type"] == "token"
    loaded_worker.send({"cmd": "generate", "id": "dup", "prompt": "y"})
    loaded_worker.send({"cmd": "cancel", "id": "dup"})
    lines = loaded_worker.read_until_terminal("dup")
    error = lines[-1]
    assert error["code"] == "duplicate_id"
    rest = loaded_worker.read_until_terminal("dup")
    assert rest[-1]["finish_reason"] == "cancelled"


def test_addressed_requests_in_flight_are_routed_by_id(loaded_worker: WorkerProcess) -> None:
    expected = {}
    for i in range(4):
        rid = f"r{i}" if i % 2 else i
        expected[rid] = loaded_worker.request(
            {"cmd": "generate", "id": rid, "prompt": f"item {i}", "max_tokens": 5 + i}
        )
    for rid in expected:
        loaded_worker.send(
            {
                "cmd": "generate",
                "id": rid,
                "prompt": f"item {expected_index(rid)}",
                "max_tokens": 5 + expected_index(rid),
            }
        )
    loaded_worker.send({"cmd": "ping", "id": "p"})
    got: dict[object, list[dict[str, object]]] = {rid: [] for rid in expected}
    pong = False
    while any(not lines or lines[-1]["type"] != "done" for lines in got.values()):
        line = loaded_worker.read()
        if line["type"] == "pong":
            pong = True
            continue
        got[line["id"]].append(line)
    assert pong
    for rid, lines in expected.items():
        assert token_ids(got[rid]) == token_ids(lines)


def expected_index(rid: object) -> int:
    return rid if isinstance(rid, int) else int(str(rid)[1:])


def test_an_id_is_free_again_once_its_terminal_line_is_read(loaded_worker: WorkerProcess) -> None:
    for _ in range(300):
        reply = loaded_worker.call({"cmd": "tokenize", "id": "same", "text": "x"})
        assert reply["type"] == "tokens", reply
