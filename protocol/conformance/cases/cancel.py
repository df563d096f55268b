"""Cancel in every phase, cancel-all, duplicate ids, a full queue, quit with work in flight.

A cancelled request's own terminal line is the only answer: ``done`` with
``finish_reason: "cancelled"`` for a generation, ``error``/``cancelled`` for
other queued requests. ``cancel`` itself is never answered.
"""

from __future__ import annotations

import time
from typing import Final

from ..matching import ABSENT
from ..session import CaseSkipped, Exchange, Session, fail
from ..table import Case, Group
from .rules import (
    check_cancelled,
    check_finished,
    done_of,
    landed,
    long_generate,
    max_concurrency,
    prefill_prompt,
)

__all__ = ["GROUP"]

MAX_BUSY_QUEUE: Final = 4096
"""A queue longer than this is not filled to test ``busy``."""


def _long(s: Session) -> Exchange:
    exchange = s.send(long_generate(s))
    assert exchange is not None
    return exchange


def _expect_cancelled_error(s: Session, exchange: Exchange | None) -> None:
    assert exchange is not None and exchange.terminal is not None
    s.expect(
        exchange.terminal,
        {"type": "error", "id": exchange.id, "code": "cancelled"},
        f"cancelled queued {exchange.cmd}",
    )


def queued(s: Session) -> str:
    running = _long(s)
    s.wait_tokens(running)
    # A load waits for the running batch to drain, and everything behind it
    # waits too (docs/protocol.md, Ordering): what follows is queued for sure,
    # however fast the worker reaches it.
    assert s.model_path is not None
    gate = s.send({"cmd": "load", "id": s.fresh_id("queued"), "path": s.model_path})
    waiting = s.send(
        {"cmd": "generate", "id": s.fresh_id("queued"), "prompt": "x", "max_tokens": 3}
    )
    tokenize = s.send({"cmd": "tokenize", "id": s.fresh_id("queued"), "text": "queued"})
    assert gate is not None and waiting is not None and tokenize is not None
    s.cancel(waiting.id)
    s.cancel(tokenize.id)
    s.cancel(gate.id)
    s.wait(waiting, tokenize, gate)
    if running.terminal is not None:
        raise fail("the running generation ended before the queued requests were cancelled")
    if check_cancelled(waiting) != "queued":
        raise fail(f"a request cancelled while queued: {waiting.terminal}")
    s.expect(
        done_of(waiting), {"ttft_ms": None, "tokens_generated": 0, "prompt_tokens": 0}, "queued"
    )
    _expect_cancelled_error(s, tokenize)
    _expect_cancelled_error(s, gate)
    s.cancel(running.id)
    s.wait(running)
    check_cancelled(running)
    return (
        "behind a waiting load: generate done/cancelled (0 tokens), tokenize and the load "
        "error/cancelled; the running one went on"
    )


def decoding(s: Session) -> str:
    running = _long(s)
    s.wait_tokens(running, 3)
    sent = time.monotonic()
    s.cancel(running.id)
    s.wait(running)
    took = time.monotonic() - sent
    if check_cancelled(running) != "decode":
        raise fail(
            f"cancelled after 3 tokens, but the done line says otherwise: {running.terminal}"
        )
    return f"done/cancelled {took * 1000:.0f} ms after the cancel, {len(running.tokens)} tokens"


def prefill(s: Session) -> str:
    prompt = prefill_prompt(s)
    exchange = s.send(long_generate(s, prompt, prefix="prefill"))
    assert exchange is not None
    time.sleep(0.1)
    sent = time.monotonic()
    s.cancel(exchange.id)
    s.wait(exchange)
    took = time.monotonic() - sent
    phase = check_cancelled(exchange)
    done = done_of(exchange)
    note = landed(phase, done, took)
    if phase == "prefill":
        s.expect(done, {"tokens_generated": 0, "ttft_ms": None}, "cancelled in prefill")
    elif phase == "decode":
        note += "; prefill was too fast to catch"
    return note


def cancel_everything(s: Session) -> str:
    generations = [_long(s) for _ in range(3)]
    tokenize = s.send({"cmd": "tokenize", "id": s.fresh_id("all"), "text": "queued"})
    s.wait_tokens(generations[0])
    s.cancel()
    s.wait(*generations, tokenize)
    phases = [check_cancelled(g) for g in generations]
    if max_concurrency(s) > 1:  # decoded together; the tokenize ran between two steps
        assert tokenize is not None and tokenize.terminal is not None
        if tokenize.terminal.get("type") != "tokens":
            _expect_cancelled_error(s, tokenize)
        return f"3 generations decoded together, done/cancelled in phases {phases}"
    if phases[1:] != ["queued", "queued"]:
        raise fail(f"the two queued generations were cancelled in phases {phases[1:]}")
    _expect_cancelled_error(s, tokenize)
    return "3 generations done/cancelled, a queued tokenize error/cancelled"


def silent_cancels(s: Session) -> None:
    finished = s.stream(
        {"cmd": "generate", "id": s.fresh_id("fin"), "prompt": "x", "max_tokens": 2}
    )
    check_finished(finished, max_tokens=2)
    s.cancel(finished.id)
    s.cancel("never-sent")
    s.cancel(987654321)
    s.cancel()
    # the runner's sync ping fails on any line these produce


def duplicate_id(s: Session) -> str:
    running = _long(s)
    s.wait_tokens(running)
    s.send({"cmd": "generate", "id": running.id, "prompt": "again", "max_tokens": 2})
    s.cancel(running.id)
    error = s.wait_duplicate_error(running)
    s.expect(error, {"type": "error", "id": running.id, "code": "duplicate_id"}, "a reused id")
    s.wait(running)
    check_cancelled(running)
    return "duplicate_id at once; the first request unaffected"


def busy(s: Session) -> str:
    assert s.hello is not None
    limit = s.hello["limits"]["max_queue"]
    if limit > MAX_BUSY_QUEUE:
        raise CaseSkipped(f"max_queue {limit:,} is too long to fill")
    cap = max_concurrency(s)
    if cap > MAX_BUSY_QUEUE:
        raise CaseSkipped(f"max_concurrency {cap:,} is too large to fill")
    # A batching worker runs a tokenize between two decode steps: only
    # generations wait while its batch is full, so the queue is filled with them.
    running = [_long(s) for _ in range(cap)]
    for exchange in running:
        s.wait_tokens(exchange)
    waiting: list[Exchange | None] = (
        [_long(s) for _ in range(limit)]
        if cap > 1
        else [s.send({"cmd": "tokenize", "id": f"q-{i}", "text": "x"}) for i in range(limit)]
    )
    refused = s.send({"cmd": "tokenize", "id": "q-over", "text": "x"})
    s.cancel()
    s.wait(refused, *running, *waiting)
    assert refused is not None and refused.terminal is not None
    s.expect(
        refused.terminal,
        {"type": "error", "id": "q-over", "code": "busy"},
        f"request {limit + 1} in the queue",
    )
    for queued in waiting:
        if cap > 1:
            assert queued is not None
            check_cancelled(queued)
        else:
            _expect_cancelled_error(s, queued)
    for exchange in running:
        check_cancelled(exchange)
    return f"{cap} decoding, {limit} waiting, the next one busy"


def reuse_after_terminal(s: Session) -> str:
    for _ in range(20):
        reply = s.call({"cmd": "tokenize", "id": "same", "text": "x"})
        s.expect(reply, {"type": "tokens", "id": "same"}, "an id reused after its terminal line")
    return "one id, 20 requests in a row"


def quit_with_work_in_flight(s: Session) -> str:
    running = _long(s)
    waiting = s.send({"cmd": "generate", "id": s.fresh_id("quit"), "prompt": "x", "max_tokens": 3})
    tokenize = s.send({"cmd": "tokenize", "id": s.fresh_id("quit"), "text": "x"})
    s.wait_tokens(running)
    start = time.monotonic()
    s.send_raw(
        b'{"cmd":"quit","id":"q"}\n{"cmd":"ping","id":"after-quit"}\n',
        note='{"cmd":"quit","id":"q"} and a ping in the same write',
    )
    bye = s.track({"cmd": "quit", "id": "q"})
    s.wait(bye, running, waiting, tokenize)
    assert bye is not None and bye.terminal is not None
    s.expect(bye.terminal, {"type": "bye", "id": "q", "ok": True, "error": ABSENT}, "quit")
    last = max(e.terminal_seq for e in (running, waiting, tokenize) if e is not None)
    if bye.terminal_seq < last:
        raise fail("bye came before the terminal lines of the requests in flight")
    check_cancelled(running)
    assert waiting is not None and tokenize is not None and tokenize.terminal is not None
    if max_concurrency(s) > 1:
        # decoded beside the running one, and the tokenize ran between two steps:
        # each ended, either way, before bye
        if done_of(waiting)["finish_reason"] not in ("cancelled", "length", "stop"):
            raise fail(f"the second generation ended {done_of(waiting)} at quit")
        if tokenize.terminal.get("type") != "tokens":
            s.expect(tokenize.terminal, {"type": "error", "code": "cancelled"}, "tokenize at quit")
    else:
        if check_cancelled(waiting) != "queued":
            raise fail("the queued generation was not cancelled as queued")
        s.expect(
            tokenize.terminal, {"type": "error", "code": "cancelled"}, "a queued tokenize at quit"
        )
    s.expect_end(within=5.0)
    took = time.monotonic() - start
    return f"3 terminal lines, bye last, exit 0 {took * 1000:.0f} ms after quit"


def end_of_input_mid_generation(s: Session) -> str:
    running = _long(s)
    s.wait_tokens(running)
    start = time.monotonic()
    s.close_stdin()
    s.wait(running)
    check_cancelled(running)
    s.expect_end(within=5.0)
    took = time.monotonic() - start
    return f"done/cancelled, exit 0 {took * 1000:.0f} ms after stdin closed"


GROUP = Group(
    name="cancel",
    about="cancel in each phase; quit with work in flight",
    model=True,
    cases=(
        Case(name="cancel while queued", run=queued),
        Case(name="cancel while decoding", run=decoding),
        Case(name="cancel during prefill (long prompt)", run=prefill),
        Case(name="cancel without id: everything", run=cancel_everything),
        Case(name="cancel of unknown/finished ids", run=silent_cancels),
        Case(name="duplicate_id while in flight", run=duplicate_id),
        Case(name="busy when the queue is full", run=busy),
        Case(name="an id is free after its terminal", run=reuse_after_terminal),
        Case(name="quit with work in flight", run=quit_with_work_in_flight, ends_worker=True),
    ),
)

EOF_GROUP = Group(
    name="eof",
    about="stdin closed with a generation running",
    model=True,
    cases=(
        Case(
            name="stdin EOF mid-generation: exit 0",
            run=end_of_input_mid_generation,
            ends_worker=True,
        ),
    ),
)
