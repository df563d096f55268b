"""Several generations in flight at once, and ``progress`` lines.

A worker that batches says so in ``hello``'s ``limits.max_concurrency``;
only then is interleaving itself required. Every other check holds for a
worker that runs one generation at a time too: each stream ends with its own
terminal line, a cancel of one leaves the others alone, and ``progress``
lines come only to a request that asked for them, before its terminal line.

Not here: ``busy`` past a small queue. The kit runs the worker command it is
given as it is, so it cannot start the worker with a small ``--max-queue``;
``cancel``'s "busy when the queue is full" fills the worker's own queue.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from ..session import Exchange, Session, fail
from ..table import Case, Group
from .rules import (
    PACED,
    check_cancelled,
    check_finished,
    done_of,
    long_generate,
    max_concurrency,
)

__all__ = ["GROUP"]

STREAM_TOKENS: Final = 8
"""Tokens each of the interleaved streams asks for."""


def _generate(s: Session, prefix: str, max_tokens: int, **extra: object) -> Exchange:
    exchange = s.send(
        {
            "cmd": "generate",
            "id": s.fresh_id(prefix),
            "prompt": "Once upon a time",
            "max_tokens": max_tokens,
            "mock": PACED,
            **extra,
        }
    )
    assert exchange is not None
    return exchange


def _interleaved(order: Sequence[object]) -> bool:
    """Whether the ids of token lines, in the order read, switch back and
    forth (a, b, a), rather than one stream after the other."""
    switches = sum(1 for x, y in zip(order, order[1:], strict=False) if x != y)
    return switches >= 2


def several_streams(s: Session) -> str:
    start = len(s.read_order)
    first = _generate(s, "multi", STREAM_TOKENS)
    second = _generate(s, "multi", STREAM_TOKENS, id=s.fresh_int())
    s.wait(first, second)
    for exchange in (first, second):
        check_finished(exchange, max_tokens=STREAM_TOKENS)
    ids = {first.id, second.id}
    order = [rid for rid, kind in s.read_order[start:] if kind == "token" and rid in ids]
    cap = max_concurrency(s)
    if cap > 1:
        if not _interleaved(order):
            raise fail(
                f"hello says max_concurrency {cap}, but the token lines of two generations in"
                " flight at once did not interleave (one ran after the other)"
            )
        return f"both done; token lines interleaved (max_concurrency {cap})"
    return "both done, one after the other (hello has no max_concurrency > 1: not batching)"


def cancel_one_of_many(s: Session) -> str:
    victim = s.send(long_generate(s, prefix="many"))
    others = [_generate(s, "many", STREAM_TOKENS) for _ in range(2)]
    assert victim is not None
    s.wait_tokens(victim)
    s.cancel(victim.id)
    s.wait(victim, *others)
    check_cancelled(victim)
    for other in others:
        check_finished(other, max_tokens=STREAM_TOKENS)
    return (
        f"the cancelled one ended cancelled after {len(victim.tokens)} tokens;"
        f" the other two ran to their {STREAM_TOKENS} tokens"
    )


def progress_only_when_asked(s: Session) -> str:
    plain = s.stream({"cmd": "generate", "id": s.fresh_id("plain"), "prompt": "x", "max_tokens": 3})
    check_finished(plain, max_tokens=3)  # a progress line for it fails in the session
    asked = s.stream(
        {
            "cmd": "generate",
            "id": s.fresh_id("progress"),
            "prompt": "Once upon a time",
            "max_tokens": 3,
            "progress": True,
        }
    )
    check_finished(asked, max_tokens=3)
    lines = asked.lines
    types = [line["type"] for line in lines]
    first_token = types.index("token") if "token" in types else len(types)
    progress = asked.progress
    for line in progress:
        if line["stage"] != "prefill":
            raise fail(f"{asked.label}: a generate's progress stage {line['stage']!r}: {line}")
        done, total = line.get("done"), line.get("total")
        if isinstance(done, int) and isinstance(total, int) and done > total:
            raise fail(f"{asked.label}: progress done {done} > total {total}: {line}")
    if "progress" in types[first_token:]:
        raise fail(f"{asked.label}: a prefill progress line after the first token")
    dones = [int(line["done"]) for line in progress if isinstance(line.get("done"), int)]
    if dones != sorted(dones):
        raise fail(f"{asked.label}: progress went backwards: {dones}")
    if not progress:
        return "no progress lines unasked; none asked either (the worker does not report)"
    done = done_of(asked)
    return (
        f"no progress lines unasked; {len(progress)} before the tokens when asked"
        f" ({done['prompt_tokens']} prompt tokens)"
    )


GROUP = Group(
    name="batching",
    about="several generations in flight at once; progress lines",
    model=True,
    cases=(
        Case(name="several streams interleave", run=several_streams),
        Case(name="cancel one of many", run=cancel_one_of_many),
        Case(name="progress only when asked", run=progress_only_when_asked),
    ),
)
