"""Property tests over the worker's whole input, against one real ``python -m bridge``.

Each example is a batch of lines sent to the same worker (the tiny model
loaded); ``FuzzWorker.exchange`` checks the invariants after every batch:
the worker is alive, stdout holds only JSON replies the schema accepts,
every request has exactly one terminal line (``cancel`` none), and no
``internal`` code comes back. ``quit`` ends a worker, so its property runs
on fresh workers. See ``tests/reliability/profile.py`` for the CI and long
profiles.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, note
from hypothesis import strategies as st

from tests.reliability import strategies as fs
from tests.reliability.hostile import encode
from tests.reliability.profile import LONG, profile
from tests.reliability.wire import (
    FuzzWorker,
    Kind,
    WorkerChild,
    _Expected,
    _key,
    classify,
    raise_violations,
)

pytestmark = pytest.mark.timeout(0 if LONG else 600)  # the long profile runs for hours


def run(fuzz: FuzzWorker, items: list[fs.Item]) -> None:
    batch = fs.confine(items, str(fuzz.workdir))
    for item in batch:
        note(repr(item)[:500])
    raise_violations(fuzz.exchange(batch, settle_s=5.0))


@profile(ci_examples=60, long_examples=20_000)
@given(items=fs.batches(fs.raw_lines()))
def test_random_bytes(fuzz: FuzzWorker, items: list[fs.Item]) -> None:
    run(fuzz, items)


@profile(ci_examples=60, long_examples=20_000)
@given(items=fs.batches(fs.json_lines()))
def test_random_json(fuzz: FuzzWorker, items: list[fs.Item]) -> None:
    run(fuzz, items)


@profile(ci_examples=60, long_examples=20_000)
@given(items=fs.interleaved())
def test_hostile_requests_interleaved_with_cancels_and_duplicate_ids(
    fuzz: FuzzWorker, items: list[fs.Item]
) -> None:
    run(fuzz, items)


@profile(ci_examples=4, long_examples=200)
@given(
    before=fs.interleaved(),
    quit_id=st.none() | st.sampled_from(["q", 7]),
    after=fs.batches(fs.json_lines() | fs.raw_lines(), max_size=3),
)
def test_quit_ends_everything_in_flight_then_exits_0(
    fuzz: FuzzWorker, before: list[fs.Item], quit_id: object, after: list[fs.Item]
) -> None:
    """Requests before ``quit`` each get their terminal line, then ``bye`` (when
    addressed) is the last line, lines after it are never read, and the worker
    exits 0 promptly."""
    batch = fs.confine(before, str(fuzz.workdir))
    quit_line = (
        orjson.dumps({"cmd": "quit", **({} if quit_id is None else {"id": quit_id})}) + b"\n"
    )
    tail = [item for item in fs.confine(after, str(fuzz.workdir)) if isinstance(item, bytes)]
    child = WorkerChild(["--max-line-bytes", str(fuzz.max_line_bytes)], fuzz.workdir)
    try:
        child.write(encode({"cmd": "load", "id": "setup", "path": str(fuzz.model)}))
        while (raw := child.lines.get(timeout=60)) is not None:
            if orjson.loads(raw).get("id") == "setup":
                break
        sent = [classify(item, fuzz.max_line_bytes) for item in batch if isinstance(item, bytes)]
        for item in batch:
            if isinstance(item, float):
                time.sleep(item)
            else:
                child.write(item)
        started = time.monotonic()
        with contextlib.suppress(BrokenPipeError):  # it may stop reading at quit, as it should
            child.write(quit_line + b"".join(tail))
        rc = child.proc.wait(10)
        took = time.monotonic() - started
        child.close()
        out = []
        while (raw := child.lines.get(timeout=5)) is not None:
            out.append(raw)
    finally:
        child.close()
    note(f"sent: {batch!r}"[:2000])
    note(f"got: {out!r}"[:2000])
    assert rc == 0, f"exit status {rc}; stderr:\n{child.stderr_tail}"
    assert took < 5.0, f"the worker took {took:.1f} s to exit after quit"
    lines = [orjson.loads(raw) for raw in out]
    terminals = [line for line in lines if line.get("type") not in ("token", "progress")]
    if quit_id is not None:
        assert terminals and terminals[-1] == {"type": "bye", "id": quit_id, "ok": True}, terminals[
            -3:
        ]
        terminals = terminals[:-1]
    assert not any(t.get("type") == "bye" for t in terminals)
    assert not any(t.get("code") == "internal" for t in terminals), terminals
    answered = [s for s in sent if s.kind not in (Kind.BLANK, Kind.CANCEL)]
    assert len(terminals) == len(answered), (len(terminals), len(answered))
    want: dict[object, int] = {}
    for s in answered:
        key = (type(s.id).__name__, s.id) if s.kind is Kind.ADDRESSED else None
        want[key] = want.get(key, 0) + 1
    got: dict[object, int] = {}
    for t in terminals:
        key = (type(t["id"]).__name__, t["id"]) if "id" in t else None
        got[key] = got.get(key, 0) + 1
    assert got == want


def test_the_fuzzed_worker_is_the_real_one(fuzz: FuzzWorker, tiny_model: Path) -> None:
    """The properties ran against ``python -m bridge`` with the tiny model, not a stand-in."""
    assert fuzz.exchange([encode({"cmd": "info", "id": "i"})]) == []
    assert fuzz.stats.requests > 0 and fuzz.stats.restarts == 0


def test_batched_lines_interleave_and_progress_is_not_terminal(fuzz: FuzzWorker) -> None:
    """The model of the worker is the batching one: a ``tokenize`` between two
    running generations is answered before they end, their token lines
    interleave, and ``progress`` lines come only for the request that asked;
    none of it is a violation, and every request still ends exactly once."""
    prompt = "Once upon a time"
    lines = [
        encode(
            {"cmd": "generate", "id": "g1", "prompt": prompt, "max_tokens": 40, "progress": True}
        ),
        encode({"cmd": "generate", "id": "g2", "prompt": prompt, "max_tokens": 40}),
        encode({"cmd": "tokenize", "id": "t", "text": "x"}),
        encode({"cmd": "info", "id": "i"}),
    ]
    assert fuzz.exchange(lines) == []
    order = [(r.get("type"), r.get("id")) for r in fuzz.replies]
    assert order.index(("tokens", "t")) < order.index(("done", "g1")), order
    assert ("progress", "g1") in order and ("progress", "g2") not in order, order
    assert [i for _, i in order].count("g1") > 2 and order.count(("done", "g2")) == 1, order


def test_the_model_flags_what_a_batching_worker_must_not_write(tmp_path: Path) -> None:
    """Interleaving is allowed, these are not: a progress line for a request that
    did not ask, a line after a request's terminal line, a second terminal line,
    a line for an id that was never sent."""
    fuzz = FuzzWorker(tmp_path / "no-model", tmp_path)  # never started: only its bookkeeping
    expected: dict[Any, _Expected] = {}
    for request in (
        {"cmd": "generate", "id": "p", "prompt": "x", "progress": True},
        {"cmd": "generate", "id": "q", "prompt": "x"},
    ):
        line = encode(request)
        sent = classify(line)
        expected.setdefault(_key(sent.id), _Expected()).sent.append((sent, line))
    done = {"type": "done", "done": True, "finish_reason": "length", "tokens_generated": 1}
    done |= {"prompt_tokens": 1, "prompt_tps": 0.0, "generation_tps": 0.0, "ttft_ms": None}
    done |= {"queue_ms": 0.0, "peak_memory_bytes": 0}
    out = [
        {"type": "progress", "id": "p", "stage": "prefill", "done": 1, "total": 1},
        {"type": "token", "id": "q", "token": "a", "token_id": 5},
        {"type": "token", "id": "p", "token": "a", "token_id": 5},
        {"type": "progress", "id": "q", "stage": "prefill", "done": 1, "total": 1},
        {**done, "id": "p"},
        {"type": "token", "id": "p", "token": "b", "token_id": 6},
        {"type": "progress", "id": "p", "stage": "prefill", "done": 1, "total": 1},
        {**done, "id": "q"},
        {**done, "id": "q"},
        {"type": "token", "id": "r", "token": "a", "token_id": 5},
    ]
    violations: list[str] = []
    for reply in out:
        fuzz._take(orjson.dumps(reply), expected, violations)
    violations += fuzz._check(expected, {})
    want = [
        "misrouted: a progress line for a request that did not ask",
        "extra: more terminal lines than requests for id 'q'",
        "misrouted: a line for a request that was never sent",
        "extra: 1 token line(s) after the terminal line for id ('str', 'p')",
        "extra: 1 progress line(s) after the terminal line for id ('str', 'p')",
    ]
    assert len(violations) == len(want), violations
    assert all(v.startswith(w) for v, w in zip(violations, want, strict=True)), violations
