"""Addressed requests in flight decode together: their scripted tokens interleave.

Assertions are on order and structure: each step of the scripted batch
writes one token for every running request, in admission order, so once
every stream has started, the token lines cycle through the ids. Durations
are only lower bounds (a loaded machine is slower, never faster), or
generous upper ones.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import orjson
import pytest

from tests.mock_worker.harness import Line, MockWorker, decode, text_of

pytestmark = pytest.mark.timeout(30)


def generate(rid: str, prompt: str, max_tokens: int, **extra: object) -> dict[str, object]:
    return {"cmd": "generate", "id": rid, "prompt": prompt, "max_tokens": max_tokens, **extra}


def script(prompt: str, max_tokens: int) -> str:
    """The mock's output for ``prompt``: its words, cyclically."""
    words = prompt.split()
    return " ".join(words[i % len(words)] for i in range(max_tokens))


def send_all(worker: MockWorker, requests: Sequence[dict[str, object]]) -> None:
    """In one write, so that they arrive together."""
    worker.send(b"".join(orjson.dumps(r) + b"\n" for r in requests))


def of(lines: Sequence[Line], rid: str) -> list[Line]:
    return [line for line in lines if line.get("id") == rid]


def token_ids(lines: Sequence[Line]) -> list[str]:
    return [line["id"] for line in lines if line["type"] == "token"]


def assert_interleaved(lines: Sequence[Line], ids: Sequence[str]) -> None:
    """From the last first token to the first terminal line, tokens go round the ids."""
    order = token_ids(lines)
    start = max(order.index(rid) for rid in ids)
    first_end = min(i for i, line in enumerate(lines) if line["type"] == "done")
    window = token_ids(lines[:first_end])[start:]
    assert len(window) >= 2 * len(ids), order
    # every window of len(ids) consecutive tokens has one of each id
    for i in range(len(window) - len(ids) + 1):
        assert sorted(window[i : i + len(ids)]) == sorted(ids), (i, order)


@pytest.mark.parametrize("count", [2, 3])
def test_concurrent_generates_interleave(count: int) -> None:
    prompts = ["a b c", "d e", "f g h i"][:count]
    ids = [f"g{k}" for k in range(count)]
    with MockWorker() as worker:
        worker.load()
        slow = {"mock": {"token_delay": 0.01}}
        send_all(
            worker, [generate(rid, p, 100, **slow) for rid, p in zip(ids, prompts, strict=True)]
        )
        lines = worker.read_streams(ids)
        assert_interleaved(lines, ids)
        for rid, prompt in zip(ids, prompts, strict=True):
            mine = of(lines, rid)
            assert text_of(mine) == script(prompt, 100)
            assert mine[-1]["type"] == "done" and mine[-1]["finish_reason"] == "length"
            assert mine[-1]["tokens_generated"] == 100


def test_each_stream_keeps_its_own_options() -> None:
    with MockWorker() as worker:
        worker.load()
        slow = {"token_delay": 0.01}
        send_all(
            worker,
            [
                generate("a", "x y", 30, logprobs=2, mock=slow),
                generate("b", "u v w", 50, mock={**slow, "eos_after": 4}),
                generate("c", "p q", 40, stop=["q p q"], mock=slow),
            ],
        )
        lines = worker.read_streams(["a", "b", "c"])
        a, b, c = of(lines, "a"), of(lines, "b"), of(lines, "c")
        assert text_of(a) == script("x y", 30) and a[-1]["finish_reason"] == "length"
        assert all(len(t["top_logprobs"]) == 2 for t in a if t["type"] == "token")
        assert text_of(b) == "u v w u" and b[-1]["finish_reason"] == "stop"
        assert all("top_logprobs" not in t for t in b)
        assert text_of(c) == "p " and c[-1]["finish_reason"] == "stop_sequence"


def test_cancel_one_of_three_mid_stream() -> None:
    prompts = {"a": "a1 a2 a3", "b": "b1 b2", "c": "c1"}
    with MockWorker() as worker:
        worker.load()
        slow = {"mock": {"token_delay": 0.01}}
        send_all(worker, [generate(rid, p, 80, **slow) for rid, p in prompts.items()])
        seen: list[Line] = []
        while sum(1 for line in seen if line["id"] == "b") < 5:
            seen.append(worker.read())
        worker.send({"cmd": "cancel", "id": "b"})
        lines = seen + worker.read_streams(["a", "b", "c"])
        b = of(lines, "b")
        assert b[-1]["type"] == "done" and b[-1]["finish_reason"] == "cancelled"
        assert 5 <= b[-1]["tokens_generated"] < 80
        assert script(prompts["b"], 80).startswith(text_of(b))
        for rid in ("a", "c"):
            mine = of(lines, rid)
            assert text_of(mine) == script(prompts[rid], 80)
            assert mine[-1]["finish_reason"] == "length"
        # the other two went on after b's end
        b_end = lines.index(b[-1])
        assert {"a", "c"} <= set(token_ids(lines[b_end:]))


def test_max_concurrency_1_runs_them_one_after_another() -> None:
    with MockWorker("--max-concurrency", "1") as worker:
        hello = worker.call({"cmd": "hello", "id": "h"})
        assert hello["limits"]["max_concurrency"] == 1
        worker.load()
        send_all(worker, [generate(rid, "a b", 20) for rid in ("x", "y", "z")])
        lines = worker.read_streams(["x", "y", "z"])
        assert [(line["id"], line["type"]) for line in lines] == [
            (rid, kind) for rid in ("x", "y", "z") for kind in ["token"] * 20 + ["done"]
        ]


def test_hello_reports_max_concurrency_and_info_the_batch() -> None:
    with MockWorker("--max-concurrency", "3") as worker:
        assert worker.call({"cmd": "hello", "id": "h"})["limits"]["max_concurrency"] == 3
        worker.load()
        slow = {"mock": {"token_delay": 0.02}}
        send_all(worker, [generate(rid, "a", 10_000, **slow) for rid in ("x", "y")])
        started: set[str] = set()
        while started != {"x", "y"}:
            started.add(worker.read()["id"])
        worker.send({"cmd": "info", "id": "i"})
        while (line := worker.read())["id"] != "i":
            assert line["type"] == "token"
        assert line["batch"]["max_concurrency"] == 3 and line["batch"]["running"] == 2
        worker.send({"cmd": "cancel"})
        ends = [line for line in worker.read_streams(["x", "y"]) if line["type"] == "done"]
        assert [e["finish_reason"] for e in ends] == ["cancelled", "cancelled"]


def test_default_max_concurrency_in_hello() -> None:
    with MockWorker() as worker:
        assert worker.call({"cmd": "hello", "id": "h"})["limits"]["max_concurrency"] == 64


def test_more_requests_than_max_concurrency_wait_their_turn() -> None:
    with MockWorker("--max-concurrency", "2") as worker:
        worker.load()
        slow = {"mock": {"token_delay": 0.01}}
        send_all(worker, [generate(rid, "a b", 50, **slow) for rid in ("x", "y", "z")])
        lines = worker.read_streams(["x", "y", "z"])
        first_end = min(i for i, line in enumerate(lines) if line["type"] == "done")
        assert "z" not in token_ids(lines[:first_end])  # z waited for a free place
        assert_interleaved(lines[: first_end + 1], ["x", "y"])
        assert all(text_of(of(lines, rid)) == script("a b", 50) for rid in ("x", "y", "z"))


# -- progress ---------------------------------------------------------------------------


def test_progress_only_when_asked() -> None:
    with MockWorker() as worker:
        worker.load()
        slow = {"mock": {"token_delay": 0.01}}
        send_all(
            worker,
            [generate("p", "a b c", 10, progress=True, **slow), generate("q", "d e", 10, **slow)],
        )
        lines = worker.read_streams(["p", "q"])
        p, q = of(lines, "p"), of(lines, "q")
        assert [line["type"] for line in p] == ["progress"] + ["token"] * 10 + ["done"]
        assert p[0] == {"type": "progress", "id": "p", "stage": "prefill", "done": 5, "total": 5}
        assert p[-1]["prompt_tokens"] == 5
        assert [line["type"] for line in q] == ["token"] * 10 + ["done"]


def test_progress_of_chat_counts_the_transcript() -> None:
    with MockWorker() as worker:
        worker.load()
        request = {
            "cmd": "chat",
            "id": "c",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2,
            "progress": True,
        }
        lines = worker.request(request)
        total = len(b"user: hi\nassistant: ")
        assert lines[0] == {
            "type": "progress",
            "id": "c",
            "stage": "prefill",
            "done": total,
            "total": total,
        }
        assert [line["type"] for line in lines[1:]] == ["token", "token", "done"]


# -- faults with two streams running ------------------------------------------------------


def start_background(worker: MockWorker, rid: str = "bg", **mock: object) -> None:
    """A long stream, running (its first token read) before the test's other request."""
    worker.send(generate(rid, "bg", 10_000, mock={"token_delay": 0.01, **mock}))
    assert worker.read()["id"] == rid


def test_crash_after_counts_its_own_tokens_while_another_streams() -> None:
    with MockWorker() as worker:
        worker.load()
        start_background(worker)
        worker.send(generate("g", "a b", 100, mock={"crash_after": 3, "exit_code": 7}))
        lines = [decode(raw) for raw in worker.rest()]
        assert worker.wait() == 7
        assert all(line["type"] == "token" for line in lines)
        assert text_of(of(lines, "g")) == "a b a"
        order = token_ids(lines)
        first, last = order.index("g"), len(order) - 1 - order[::-1].index("g")
        assert "bg" in order[first:last]  # bg streamed alongside
        assert "crash_after=3 in request 'g'" in worker.stderr


def test_hang_after_stalls_the_engine_and_its_cancel_is_not_answered() -> None:
    with MockWorker() as worker:
        worker.load()
        start_background(worker)
        worker.send(generate("g", "a b", 100, mock={"hang_after": 2, "token_delay": 0.01}))
        seen: list[Line] = []
        while len(of(seen, "g")) < 2:
            seen.append(worker.read())
        in_flight = [decode(raw) for raw in worker.lines_within(0.3)]
        assert all(line["type"] == "token" for line in in_flight), in_flight
        assert not of(in_flight, "g")
        assert worker.quiet_for(0.3)  # bg stalls too: the engine is stuck
        assert worker.call({"cmd": "ping", "id": "p"})["type"] == "pong"
        worker.send({"cmd": "cancel", "id": "g"})
        worker.send({"cmd": "cancel", "id": "bg"})
        assert worker.quiet_for(0.3)
        worker.send({"cmd": "quit", "id": "q"})
        assert worker.wait() == 0
        rest = [decode(raw) for raw in worker.rest()]
        assert {(line["id"], line.get("code")) for line in rest if line["type"] == "error"} == {
            ("g", "shutting_down"),
            ("bg", "shutting_down"),
        }
        assert rest[-1]["type"] == "bye" and rest[-1]["id"] == "q"


def test_token_delay_is_one_wait_per_step_at_the_slowest_pace() -> None:
    with MockWorker() as worker:
        worker.load()
        started = time.perf_counter()
        send_all(
            worker,
            [
                generate("slow", "a", 6, mock={"token_delay": 0.1}),
                generate("fast", "b", 6),
                generate("also", "c", 6, mock={"token_delay": 0.1}),
            ],
        )
        lines = worker.read_streams(["slow", "fast", "also"])
        elapsed = time.perf_counter() - started
        # six steps of one 0.1 s wait each (not 0.1 s per stream per token: that would be 1.2 s)
        assert elapsed >= 0.6
        fast = of(lines, "fast")
        assert text_of(fast) == "b b b b b b"
        # the fast stream went at the batch's pace: it did not finish before the slow one began
        assert lines.index(fast[-1]) > token_ids(lines).index("slow")


def test_token_delay_is_cut_short_by_a_cancel_and_the_others_go_on() -> None:
    with MockWorker() as worker:
        worker.load()
        slow = {"mock": {"token_delay": 10}}
        send_all(
            worker,
            [
                generate("x", "a", 1000, progress=True, **slow),
                generate("y", "b", 1000, progress=True, **slow),
            ],
        )
        prefilled: set[str] = set()
        while prefilled != {"x", "y"}:  # y may be admitted one step (10 s) after x
            line = worker.read(timeout=15)
            if line["type"] == "progress":
                prefilled.add(line["id"])
        started = time.perf_counter()
        worker.send({"cmd": "cancel", "id": "y"})
        lines: list[Line] = []
        while not any(line["type"] == "done" for line in lines):
            lines.append(worker.read(timeout=8))
        assert time.perf_counter() - started < 8
        done = next(line for line in lines if line["type"] == "done")
        assert done["id"] == "y" and done["finish_reason"] == "cancelled"
        assert done["tokens_generated"] == 0
        assert worker.call({"cmd": "ping", "id": "p"})["type"] == "pong"
        worker.send({"cmd": "cancel", "id": "x"})
        x = of(lines, "x") + worker.read_until_terminal("x", timeout=8)
        assert x[-1]["finish_reason"] == "cancelled"


def test_ignore_cancel_of_one_stalls_the_engine() -> None:
    with MockWorker() as worker:
        worker.load()
        start_background(worker)
        worker.send(generate("g", "a b", 10_000, mock={"token_delay": 0.01, "ignore_cancel": True}))
        while worker.read()["id"] != "g":
            pass
        worker.send({"cmd": "cancel", "id": "g"})
        in_flight = [decode(raw) for raw in worker.lines_within(0.3)]
        assert all(line["type"] == "token" for line in in_flight), in_flight
        assert worker.quiet_for(0.3)  # no done for g, and bg stalls with it
        assert worker.call({"cmd": "ping", "id": "p"})["type"] == "pong"
        assert worker.alive()  # a host must time out and kill it


def test_without_ignore_cancel_the_other_stream_goes_on() -> None:
    with MockWorker() as worker:
        worker.load()
        start_background(worker)
        worker.send(generate("g", "a b", 10_000, mock={"token_delay": 0.01}))
        while worker.read()["id"] != "g":
            pass
        worker.send({"cmd": "cancel", "id": "g"})
        while (line := worker.read())["type"] != "done":
            pass
        assert line["id"] == "g" and line["finish_reason"] == "cancelled"
        after = [decode(raw) for raw in worker.lines_within(1.0)]
        assert after and {line["id"] for line in after} == {"bg"}


def test_garbage_after_in_one_stream_leaves_the_other_whole() -> None:
    with MockWorker() as worker:
        worker.load()
        slow = {"token_delay": 0.01}
        send_all(
            worker,
            [
                generate("x", "a b", 8, mock={**slow, "garbage_after": 3}),
                generate("y", "c", 8, mock=slow),
            ],
        )
        raw: list[bytes] = []
        while sum(1 for r in raw if b'"done"' in r) < 2:
            line = worker.read_raw()
            assert line is not None
            raw.append(line)
        assert raw.count(b"this is not json\n") == 1
        lines = [decode(r) for r in raw if r != b"this is not json\n"]
        garbage_at = raw.index(b"this is not json\n")
        assert text_of(of([decode(r) for r in raw[:garbage_at]], "x")) == "a b a"
        assert text_of(of(lines, "x")) == script("a b", 8)
        assert text_of(of(lines, "y")) == script("c", 8)
