"""Vision requests decoded together: mlx-vlm's BatchGenerator beside solo lanes.

The first request of a burst runs on the solo lane (the engine's own
``generate_step``, with the prompt cache); the others join mlx-vlm's batch
when their sampling is the batch's, or run on solo lanes of their own,
stepped in turn. Greedy output is the same whatever lane a request takes,
with and without images.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bridge.engines.engine_protocol import Decoded, Failed, Prepared, Step
from protocol.requests import Chat, Load, parse_request
from tests.bridge.test_vision import picture
from tests.bridge.test_vision import tiny_vlm as tiny_vlm  # the session fixture
from tests.harness import WorkerProcess, token_ids

pytest.importorskip("PIL")

COLOURS = ("red", "green", "blue", None)


def messages(i: int, colour: str | None) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "text", "text": f"What is this, {i}?"}]
    if colour is not None:
        content.append({"type": "image_url", "image_url": {"url": picture(colour)}})
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def engine(tiny_vlm: Path) -> Iterator[Any]:
    from bridge.engines.vision.engine import MlxVlmEngine

    engine = MlxVlmEngine(prompt_cache_entries=0)  # every request cold, as in a batch
    engine.warm_up()
    engine.load(Load(path=str(tiny_vlm)))
    yield engine
    engine.unload()  # not close(): that ends this thread's MLX streams, which later tests use


def prepare(engine: Any, i: int, colour: str | None, **fields: Any) -> Prepared:
    request = parse_request(
        {"cmd": "chat", "id": i, "messages": messages(i, colour), "max_tokens": 20, **fields}
    )
    assert isinstance(request, Chat)
    prepared: Prepared = engine.prepare(request)
    return prepared


def alone(engine: Any, prepared: Prepared) -> list[int]:
    _, steps = engine.generate(prepared, lambda: False)
    return [s.token_id for s in steps]


@dataclass
class Driven:
    """What a decoder stepped to its end gave: each sequence's steps, the
    decoder step each one ended at, and the failures."""

    steps: dict[int, list[Step]] = field(default_factory=lambda: defaultdict(list))
    ended: dict[int, int] = field(default_factory=dict)
    failed: list[Failed] = field(default_factory=list)

    def tokens(self, seq: int) -> list[int]:
        return [s.token_id for s in self.steps[seq]]


def drive(decoder: Any, before: Mapping[int, Callable[[], None]] | None = None) -> Driven:
    """Step ``decoder`` until a step gives nothing; ``before[k]`` runs before step k."""
    out = Driven()
    for k in range(2000):
        if before and k in before:
            before[k]()
        events = decoder.step()
        if not events:
            return out
        for e in events:
            if isinstance(e, Decoded):
                out.steps[int(e.seq)].append(e.step)
                if e.step.finish_reason is not None:
                    out.ended[int(e.seq)] = k
            elif isinstance(e, Failed):
                out.failed.append(e)
    raise AssertionError("the decoder never ran dry")


def together(engine: Any, prepared: list[Prepared]) -> tuple[dict[int, list[int]], dict[int, str]]:
    """Every request added at once; the tokens and the lane each took."""
    decoder = engine.decoder()
    lanes: dict[int, str] = {}
    for i, p in enumerate(prepared):
        decoder.add(i, p, should_abort=lambda: False)
        lanes[i] = decoder.lane(i)
    driven = drive(decoder)
    assert all(decoder.lane(i) is None for i in range(len(prepared)))  # every lane let go
    decoder.close()
    return {i: driven.tokens(i) for i in range(len(prepared))}, lanes


def test_requests_with_and_without_images_batch_and_answer_as_alone(engine: Any) -> None:
    prepared = [prepare(engine, i, c) for i, c in enumerate(COLOURS)]
    expected = [alone(engine, p) for p in prepared]
    tokens, lanes = together(engine, prepared)
    assert lanes == {0: "solo", 1: "batch", 2: "batch", 3: "batch"}
    assert [tokens[i] for i in range(4)] == expected


def test_requests_the_batch_cannot_take_run_on_solo_lanes_in_turn(engine: Any) -> None:
    """logprobs (and a seed, a repetition penalty, a logit bias) keep a
    request on a solo lane of its own; several are stepped in turn, each with
    its own position state (Qwen2-VL keeps it on the model)."""
    prepared = [prepare(engine, i, c, logprobs=2) for i, c in enumerate(COLOURS)]
    expected = [alone(engine, p) for p in prepared]
    tokens, lanes = together(engine, prepared)
    assert set(lanes.values()) == {"solo"}
    assert [tokens[i] for i in range(4)] == expected


def test_another_sampler_runs_beside_the_batch(engine: Any) -> None:
    greedy = [prepare(engine, i, c) for i, c in enumerate(COLOURS[:3])]
    sampled = prepare(engine, 3, None, temperature=0.7)
    tokens, lanes = together(engine, [*greedy, sampled])
    assert lanes == {0: "solo", 1: "batch", 2: "batch", 3: "solo"}
    assert len(tokens[3]) == 20
    assert [tokens[i] for i in range(3)] == [alone(engine, p) for p in greedy]


def test_a_batched_request_removed_midway_leaves_the_others(engine: Any) -> None:
    prepared = [prepare(engine, i, c) for i, c in enumerate(COLOURS)]
    expected = [alone(engine, p) for p in prepared]
    decoder = engine.decoder()
    for i, p in enumerate(prepared):
        decoder.add(i, p, should_abort=lambda: False)

    def remove() -> None:
        assert decoder.lane(2) == "batch"
        decoder.remove(2)  # decoding
        assert decoder.lane(2) is None

    driven = drive(decoder, {6: remove})
    decoder.close()
    assert 0 < len(driven.tokens(2)) < 20
    assert [driven.tokens(i) for i in (0, 1, 3)] == [expected[i] for i in (0, 1, 3)]


def test_length_and_stop_end_batched_rows(engine: Any) -> None:
    """A row ends at max_tokens (length) or at EOS (stop, whose token is not
    part of the answer), and its last step says so."""
    prepared = [prepare(engine, i, c, max_tokens=3 + i) for i, c in enumerate(COLOURS)]
    decoder = engine.decoder()
    for i, p in enumerate(prepared):
        decoder.add(i, p, should_abort=lambda: False)
    driven = drive(decoder)
    decoder.close()
    for i in range(4):
        finishes = [s.finish_reason for s in driven.steps[i]]
        assert finishes[-1] in ("length", "stop")
        assert all(f is None for f in finishes[:-1])
        if finishes[-1] == "length":
            assert len(finishes) == 3 + i


# -- through a worker ------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker(tiny_vlm: Path) -> Iterator[WorkerProcess]:
    with WorkerProcess("bridge", args=["--prompt-cache-entries", "0"]) as w:
        assert w.call({"cmd": "load", "id": "l", "path": str(tiny_vlm)}, timeout=120)["vision"]
        yield w


def chat(rid: str, i: int, colour: str | None, max_tokens: int) -> dict[str, Any]:
    return {"cmd": "chat", "id": rid, "messages": messages(i, colour), "max_tokens": max_tokens}


def test_a_long_vision_answer_does_not_hold_the_others_back(worker: WorkerProcess) -> None:
    """A runs long; B, C and D end while it still runs (it is cancelled
    after them: had they waited for it, it would have ended by length)."""
    alone_answers = {
        rid: token_ids(worker.request(chat(rid, i, c, 12)))
        for rid, (i, c) in zip("BCD", enumerate(COLOURS[1:], start=1), strict=True)
    }
    worker.send(chat("A", 0, "red", 3000))
    for rid, (i, c) in zip("BCD", enumerate(COLOURS[1:], start=1), strict=True):
        worker.send(chat(rid, i, c, 12))
    lines: dict[object, list[dict[str, Any]]] = {rid: [] for rid in "ABCD"}
    left = set("BCD")
    while left:
        line = worker.read(timeout=120)
        lines[line["id"]].append(line)
        if line["type"] not in ("token", "progress"):
            left.discard(line["id"])
    worker.send({"cmd": "cancel", "id": "A"})
    lines["A"] += worker.read_until_terminal("A", timeout=120)
    assert lines["A"][-1]["finish_reason"] == "cancelled", lines["A"][-1]
    for rid in "BCD":
        assert lines[rid][-1]["type"] == "done", lines[rid][-1]
        assert token_ids(lines[rid]) == alone_answers[rid]
    info = worker.call({"cmd": "info", "id": "i"})
    assert info["batch"]["running"] == 0


def test_a_request_joins_a_running_batch_at_a_small_capacity(tiny_vlm: Path) -> None:
    """With --max-concurrency 3, a third request joins a batch of one that
    is decoding (mlx-vlm admits rows only while a whole prefill batch fits
    under its limit, which the decoder sets above the capacity)."""
    from bridge.engines.vision.engine import MlxVlmEngine

    small = MlxVlmEngine(prompt_cache_entries=0, max_concurrency=3)
    small.load(Load(path=str(tiny_vlm)))
    try:
        prepared = [prepare(small, i, c) for i, c in enumerate(COLOURS[:3])]
        expected = [alone(small, p) for p in prepared]
        decoder = small.decoder()
        for i in range(2):
            decoder.add(i, prepared[i], should_abort=lambda: False)

        def join() -> None:
            decoder.add(2, prepared[2], should_abort=lambda: False)
            assert decoder.lane(2) == "batch"

        driven = drive(decoder, {5: join})
        decoder.close()
        # the others end at step 19 or 20; had it waited for them, it would end past 40
        assert driven.ended[2] < 20 + 5 + 3, driven.ended
        assert [driven.tokens(i) for i in range(3)] == expected
    finally:
        small.unload()


def test_vision_requests_are_admitted_against_the_kv_budget(tiny_vlm: Path) -> None:
    """The fixture's language model caches 512 bytes a token (2 layers x 2 KV
    heads x 16 x 2 x float32): with room for one 600-token row, two requests
    of about 500 run one after the other, and one that can never fit is
    refused before it starts."""
    weights = sum(p.stat().st_size for p in tiny_vlm.glob("*.safetensors"))
    args = ["--memory-budget", str(weights + 600 * 512), "--prompt-cache-entries", "0"]
    with WorkerProcess("bridge", args) as w:
        loaded = w.call({"cmd": "load", "id": "l", "path": str(tiny_vlm), "force": True})
        assert loaded["type"] == "loaded", loaded
        never = w.call(chat("never", 0, "red", 4000))
        assert never["code"] == "out_of_memory" and "KV" in never["error"], never
        w.send(chat("a", 1, "green", 470))
        w.send(chat("b", 2, "blue", 470))
        lines = w.collect(["a", "b"], timeout=120)
        last_a = max(i for i, line in enumerate(w.raw) if b'"id":"a"' in line)
        first_b = min(i for i, line in enumerate(w.raw) if b'"id":"b"' in line)
        assert last_a < first_b  # b waited for a's KV cache to go
        assert lines["b"][-1]["queue_ms"] > lines["a"][-1]["queue_ms"]
        info = w.call({"cmd": "info", "id": "i"})
        assert info["batch"]["kv_budget_bytes"] == 600 * 512


def test_a_solo_lane_that_fails_ends_only_its_request(tiny_vlm: Path) -> None:
    """The solo lanes run in turn: one that raises (the engine's ``generate``,
    the decoder's seam, fails after three tokens here) ends its own request
    with a Failed event; the others answer as alone."""
    from bridge.engines.vision.engine import MlxVlmEngine

    class FailingEngine(MlxVlmEngine):
        failing: Prepared | None = None

        def generate(self, prepared: Prepared, should_abort: Any) -> Any:
            cached, steps = super().generate(prepared, should_abort)
            if prepared is not self.failing:
                return cached, steps

            def failing() -> Any:
                try:
                    for n, step in enumerate(steps):
                        if n == 3:
                            raise RuntimeError("out of memory, say")
                        yield step
                finally:
                    steps.close()

            return cached, failing()

    engine = FailingEngine(prompt_cache_entries=0)
    engine.load(Load(path=str(tiny_vlm)))
    try:
        prepared = [prepare(engine, i, c, logprobs=1) for i, c in enumerate(COLOURS)]
        expected = [alone(engine, p) for p in prepared]
        engine.failing = prepared[1]
        decoder = engine.decoder()
        for i, p in enumerate(prepared):
            decoder.add(i, p, should_abort=lambda: False)
        assert {decoder.lane(i) for i in range(4)} == {"solo"}  # logprobs: no batch
        driven = drive(decoder)
        decoder.close()
    finally:
        engine.unload()
    assert [(f.seq, f.error.code) for f in driven.failed] == [(1, "internal")]
    assert "out of memory, say" in driven.failed[0].error.message
    assert driven.tokens(1) == expected[1][:3]
    assert [driven.tokens(i) for i in (0, 2, 3)] == [expected[i] for i in (0, 2, 3)]


def test_a_batched_request_removed_while_waiting_or_prefilling(engine: Any) -> None:
    """Removed before mlx-vlm's batch took it in (waiting) and right after its
    first step (prefilled with the others): nothing of the first comes out,
    at most its first token of the second, and the others answer as alone."""
    prepared = [prepare(engine, i, c) for i, c in enumerate(COLOURS)]
    expected = [alone(engine, p) for p in prepared]
    decoder = engine.decoder()
    for i, p in enumerate(prepared):
        decoder.add(i, p, should_abort=lambda: False)
    decoder.remove(1)  # queued in mlx-vlm's batch, not yet prefilled
    assert decoder.lane(1) is None
    driven = drive(decoder, {1: lambda: decoder.remove(2)})
    decoder.close()
    assert 1 not in driven.steps and len(driven.steps[2]) <= 1
    assert [driven.tokens(i) for i in (0, 3)] == [expected[i] for i in (0, 3)]
