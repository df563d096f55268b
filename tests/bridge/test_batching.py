"""Continuous batching through the real worker, on the float32 CPU fixture.

Addressed requests in flight together decode in one batch (mlx-lm's
``BatchGenerator``; one alone on ``generate_step``), and each request's output
is exactly what it is alone: the fixture's greedy choices are decisive, so
any difference is a bug (a row mixed up, a cache moved wrongly between the
lanes), not floating-point noise.

No assertion here depends on timing: where the issue asks for a bound
(prefill must not freeze the batch), the test checks the structure that
gives it (the decoding stream gets tokens while the long prompt prefills),
and the benchmark measures the times.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor import Worker
from tests.harness import Line, WorkerProcess, token_ids

pytestmark = pytest.mark.timeout(180)

PROMPTS = ("Once upon a time", "def main():", "The quick brown fox", "import os\nimport sys")
LONG_PROMPT = "import os, sys, json; print(os.path.join('a', 'b')); " * 120  # ~3,000 tokens


def gen(rid: str, prompt: str, **fields: Any) -> dict[str, Any]:
    return {"cmd": "generate", "id": rid, "prompt": prompt, "max_tokens": 24, **fields}


@pytest.fixture(scope="module")
def worker(tiny_model: Path) -> Iterator[WorkerProcess]:
    with WorkerProcess("bridge", ["--prompt-cache-entries", "0"]) as w:
        assert w.call({"cmd": "load", "id": "setup", "path": str(tiny_model)})["type"] == "loaded"
        yield w


def solo(worker: WorkerProcess, request: dict[str, Any]) -> list[Line]:
    return worker.request({**request, "id": f"solo-{request['id']}"})


def together(worker: WorkerProcess, requests: list[dict[str, Any]]) -> dict[object, list[Line]]:
    for request in requests:
        worker.send(request)
    return worker.collect([r["id"] for r in requests])


def test_hello_reports_the_capacity(worker: WorkerProcess) -> None:
    limits = worker.call({"cmd": "hello", "id": "h"})["limits"]
    assert limits["max_concurrency"] == 64
    assert limits["prefill_chunk_tokens"] == 512


def test_batched_greedy_output_equals_each_request_alone(worker: WorkerProcess) -> None:
    requests = [gen(f"b{i}", p) for i, p in enumerate(PROMPTS)]
    alone = {r["id"]: token_ids(solo(worker, r)) for r in requests}
    batched = together(worker, requests)
    for rid, lines in batched.items():
        assert token_ids(lines) == alone[rid], rid
        assert lines[-1]["finish_reason"] == "length"
        assert lines[-1]["tokens_generated"] == 24


def test_chat_batched_equals_alone(worker: WorkerProcess) -> None:
    requests = [
        {
            "cmd": "chat",
            "id": f"c{i}",
            "messages": [{"role": "user", "content": p}],
            "max_tokens": 16,
        }
        for i, p in enumerate(PROMPTS[:3])
    ]
    alone = {r["id"]: token_ids(solo(worker, r)) for r in requests}
    batched = together(worker, requests)
    assert {rid: token_ids(lines) for rid, lines in batched.items()} == alone


def test_a_request_joining_a_running_one_changes_neither(worker: WorkerProcess) -> None:
    """The first runs alone (solo lane), moves into the batch when the second
    arrives, and back to the solo lane when the second ends."""
    long = gen("long", PROMPTS[0], max_tokens=80)
    short = gen("short", PROMPTS[1], max_tokens=10)
    alone_long, alone_short = token_ids(solo(worker, long)), token_ids(solo(worker, short))
    worker.send(long)
    first = [worker.read() for _ in range(5)]
    assert all(line["id"] == "long" and line["type"] == "token" for line in first)
    worker.send(short)
    rest = worker.collect(["long", "short"])
    assert [line["token_id"] for line in first] + token_ids(rest["long"]) == alone_long
    assert token_ids(rest["short"]) == alone_short


def test_mixed_options_in_one_batch_each_as_alone(worker: WorkerProcess) -> None:
    requests = [
        gen("plain", PROMPTS[0]),
        gen("bias", PROMPTS[1], logit_bias={"11": 5.0, "29": 3.0}),
        gen("rep", PROMPTS[2], repetition_penalty=1.5, repetition_context_size=8),
        gen("short", PROMPTS[3], max_tokens=5),
        gen("lp", PROMPTS[0], logprobs=3),
    ]
    alone = {r["id"]: solo(worker, r) for r in requests}
    # a stop string that the request's own output contains, halfway through
    text = "".join(str(line["token"]) for line in alone["plain"][:-1])
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    requests.append(gen("stop", PROMPTS[0], stop=[stop]))
    alone["stop"] = solo(worker, requests[-1])
    assert alone["stop"][-1]["finish_reason"] == "stop_sequence"
    batched = together(worker, requests)
    for rid, lines in batched.items():
        assert [(line.get("token"), line.get("token_id")) for line in lines[:-1]] == [
            (line.get("token"), line.get("token_id")) for line in alone[rid][:-1]
        ], rid
        assert lines[-1]["finish_reason"] == alone[rid][-1]["finish_reason"], rid
        assert lines[-1]["tokens_generated"] == alone[rid][-1]["tokens_generated"], rid
    for got, want in zip(batched["lp"][:-1], alone["lp"][:-1], strict=True):
        assert got["logprob"] == pytest.approx(want["logprob"], abs=1e-4)
        assert [t["token_id"] for t in got["top_logprobs"]] == [
            t["token_id"] for t in want["top_logprobs"]
        ]


def test_seeded_requests_are_reproducible_and_independent(worker: WorkerProcess) -> None:
    def sampled(rid: str, prompt: str, seed: int) -> dict[str, Any]:
        return gen(rid, prompt, temperature=1.0, seed=seed)

    first = together(worker, [sampled("a", PROMPTS[0], 1), sampled("b", PROMPTS[1], 2)])
    again = together(worker, [sampled("a", PROMPTS[0], 1), sampled("b", PROMPTS[1], 2)])
    other = together(worker, [sampled("a", PROMPTS[0], 1), sampled("b", PROMPTS[1], 99)])
    assert token_ids(first["a"]) == token_ids(again["a"])
    assert token_ids(first["b"]) == token_ids(again["b"])
    # b's seed never changes a's tokens
    assert token_ids(other["a"]) == token_ids(first["a"])
    assert token_ids(other["b"]) != token_ids(first["b"])
    # and an unseeded sampled request beside it does not either
    mixed = together(worker, [sampled("a", PROMPTS[0], 1), gen("u", PROMPTS[2], temperature=1.0)])
    assert token_ids(mixed["a"]) == token_ids(first["a"])


def test_a_long_prompt_does_not_freeze_the_batch(worker: WorkerProcess) -> None:
    """While a ~3,000-token prompt prefills (512-token chunks, one per step),
    the stream already decoding keeps getting tokens."""
    worker.send(gen("running", PROMPTS[0], max_tokens=400))
    assert worker.read()["id"] == "running"
    worker.send(gen("long", LONG_PROMPT, max_tokens=2, progress=True))
    before_first: list[Line] = []
    seen: dict[object, list[Line]] = {"running": [], "long": []}
    while not seen["long"] or seen["long"][-1]["type"] == "progress":
        line = worker.read()
        seen[line["id"]].append(line)
        if line["id"] == "running" and not any(x["type"] == "token" for x in seen["long"]):
            before_first.append(line)
    progress = [line for line in seen["long"] if line["type"] == "progress"]
    assert len(progress) >= 4, progress
    assert [p["done"] for p in progress] == sorted(p["done"] for p in progress)
    assert progress[-1]["done"] == progress[-1]["total"] > 3000
    assert len(before_first) >= len(progress) - 1, "the batch stalled during the prefill"
    worker.send({"cmd": "cancel", "id": "running"})
    rest = worker.collect(["running", "long"])
    assert rest["running"][-1]["finish_reason"] == "cancelled"
    assert rest["long"][-1]["finish_reason"] == "length"


@pytest.mark.parametrize("phase", ["queued", "prefilling", "decoding"])
def test_cancel_one_of_several_in_each_phase(tiny_model: Path, phase: str) -> None:
    others = [gen(f"o{i}", p, max_tokens=30) for i, p in enumerate(PROMPTS[:2])]
    with WorkerProcess("bridge", ["--max-concurrency", "2"]) as w:
        w.call({"cmd": "load", "id": "setup", "path": str(tiny_model)})
        alone = {r["id"]: token_ids(w.request({**r, "id": r["id"]})) for r in others}
        victim = gen("victim", LONG_PROMPT if phase == "prefilling" else PROMPTS[2], max_tokens=500)
        if phase == "queued":  # the batch of two is full: the victim waits
            for r in others:
                w.send(r)
            w.send(victim)
        else:
            w.send(victim)
            w.send(others[0])
        while True:
            line = w.read()
            if phase != "decoding" or line["id"] == "victim":
                break
        w.send({"cmd": "cancel", "id": "victim"})
        if phase != "queued":
            w.send(others[1])
        lines = w.collect(["victim", *[r["id"] for r in others]])
        # the first line read above may have been one of them
        for r in others:
            got = token_ids(lines[r["id"]])
            assert alone[r["id"]][-len(got) :] == got if got else True
            assert lines[r["id"]][-1]["finish_reason"] == "length"
        end = lines["victim"][-1]
        assert end["finish_reason"] == "cancelled"
        if phase in ("queued", "prefilling"):
            assert end["tokens_generated"] == 0


def test_concurrency_cap_queue_and_busy(tiny_model: Path) -> None:
    with WorkerProcess("bridge", ["--max-concurrency", "1", "--max-queue", "1"]) as w:
        w.call({"cmd": "load", "id": "setup", "path": str(tiny_model)})
        w.send(gen("first", PROMPTS[0], max_tokens=100000))
        assert w.read()["id"] == "first"  # admitted and decoding
        w.send(gen("second", PROMPTS[1], max_tokens=3))  # waits: the batch is full
        w.send(gen("third", PROMPTS[2], max_tokens=3))  # the queue is full
        refused = w.read()
        while refused["id"] == "first":
            refused = w.read()
        assert refused["id"] == "third" and refused["code"] == "busy"
        w.send({"cmd": "info", "id": "i"})
        info = w.read()
        while info["id"] == "first":
            info = w.read()
        assert info["batch"]["queued"] == 1 and info["batch"]["max_concurrency"] == 1
        assert info["batch"]["running"] == 1
        w.send({"cmd": "cancel", "id": "first"})
        lines = w.collect(["first", "second"])
        assert lines["first"][-1]["finish_reason"] == "cancelled"
        assert lines["second"][-1]["finish_reason"] == "length"
        assert lines["second"][-1]["queue_ms"] > 0


def test_kv_memory_admission_queues_and_refuses(tiny_model: Path) -> None:
    """The fixture's KV cache is 512 bytes a token (2 layers x 2 KV heads x 16
    x 2 x float32); a budget of room for one 600-token row admits one request
    of 500 at a time, and refuses one that can never fit."""
    weights = sum(p.stat().st_size for p in tiny_model.glob("*.safetensors"))
    budget = weights + 600 * 512
    args = ["--memory-budget", str(budget)]
    with WorkerProcess("bridge", args) as w:
        loaded = w.call({"cmd": "load", "id": "setup", "path": str(tiny_model), "force": True})
        assert loaded["type"] == "loaded", loaded
        never = w.call(gen("never", PROMPTS[0], max_tokens=4000))
        assert never["code"] == "out_of_memory" and "KV" in never["error"]
        w.send(gen("a", PROMPTS[0], max_tokens=490))
        w.send(gen("b", PROMPTS[1], max_tokens=490))
        lines = w.collect(["a", "b"])
        assert _sequential(w.raw, "a", "b")
        assert lines["b"][-1]["queue_ms"] > lines["a"][-1]["queue_ms"]
        info = w.call({"cmd": "info", "id": "i"})
        assert info["batch"]["kv_budget_bytes"] == 600 * 512


def _sequential(raw: list[bytes], a: str, b: str) -> bool:
    """Every line of ``b`` comes after ``a``'s done."""
    ids = [line for line in raw if f'"id":"{a}"'.encode() in line or f'"id":"{b}"'.encode() in line]
    last_a = max(i for i, line in enumerate(ids) if f'"id":"{a}"'.encode() in line)
    first_b = min(i for i, line in enumerate(ids) if f'"id":"{b}"'.encode() in line)
    return last_a < first_b


def test_prompt_caches_of_two_conversations_batched_together(tiny_model: Path) -> None:
    def turn(key: str, history: list[dict[str, str]]) -> dict[str, Any]:
        return {"cmd": "chat", "id": key, "messages": history, "max_tokens": 12, "cache_key": key}

    histories = {
        "k1": [{"role": "user", "content": "Tell me about the os module. " * 20}],
        "k2": [{"role": "user", "content": "What does json.dumps do? " * 20}],
    }
    with WorkerProcess("bridge") as w:
        w.call({"cmd": "load", "id": "setup", "path": str(tiny_model)})
        first = together(w, [turn(k, h) for k, h in histories.items()])
        for key, history in histories.items():
            answer = "".join(str(line["token"]) for line in first[key][:-1])
            history += [
                {"role": "assistant", "content": answer},
                {"role": "user", "content": "And then?"},
            ]
        second = together(w, [turn(k, h) for k, h in histories.items()])
        for key in histories:
            assert second[key][-1]["cached_tokens"] > 100, second[key][-1]
        cold = {
            k: token_ids(w.request({**turn(k, h), "cache_key": f"cold-{k}"}))
            for k, h in histories.items()
        }
        assert {k: token_ids(v) for k, v in second.items()} == cold


def test_end_of_input_with_a_full_batch_ends_every_request(tiny_model: Path) -> None:
    with WorkerProcess("bridge", ["--max-concurrency", "3"]) as w:
        w.call({"cmd": "load", "id": "setup", "path": str(tiny_model)})
        ids = [f"e{i}" for i in range(5)]  # three decoding, two queued
        for i, rid in enumerate(ids):
            w.send(gen(rid, PROMPTS[i % 4], max_tokens=100000))
        assert w.read()["type"] == "token"
        w.close_stdin()
        lines = w.collect(ids, timeout=30)
        assert {rid: v[-1]["finish_reason"] for rid, v in lines.items()} == dict.fromkeys(
            ids, "cancelled"
        )
        assert w.proc.wait(timeout=10) == 0


def test_the_legacy_dialect_stays_one_at_a_time(worker: WorkerProcess) -> None:
    for prompt in PROMPTS[:2]:
        worker.send({"cmd": "generate", "prompt": prompt, "max_tokens": 6})
    lines = [worker.read() for _ in range(14)]
    assert [line.get("done") is True for line in lines].index(True) == 6
    assert all("id" not in line for line in lines)
    assert lines[-1].get("done") is True


def test_supervisor_streams_are_routed_and_equal_alone(tiny_model: Path) -> None:
    with Worker(model=str(tiny_model)) as w:
        alone = {p: [t.token_id for t in w.generate(p, max_tokens=20)] for p in PROMPTS}
        got: dict[str, list[int]] = {}

        def run(prompt: str) -> None:
            got[prompt] = [t.token_id for t in w.generate(prompt, max_tokens=20)]

        threads = [threading.Thread(target=run, args=(p,)) for p in PROMPTS]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert got == alone


@pytest.mark.parametrize("value", ["0", "-3", "x", "1e3", "", "9" * 400])
def test_a_bad_max_concurrency_is_refused_at_start(value: str) -> None:
    import subprocess

    from supervisor import module_command
    from tests.harness import ROOT, worker_env

    done = subprocess.run(
        [*module_command("bridge"), "--max-concurrency", value],
        capture_output=True,
        env=worker_env(),
        cwd=ROOT,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    if value == "9" * 400:  # a huge cap is only a cap: the worker starts and serves
        assert done.returncode == 0, done.stderr
        return
    assert done.returncode == 2
    assert b"--max-concurrency" in done.stderr
