"""A conversation's second turn through a worker under test and a baseline worker."""

from __future__ import annotations

from typing import Any

from tests.harness import WorkerProcess, token_ids


def second_turn_matches(
    worker: WorkerProcess, baseline: WorkerProcess, chat: list[dict[str, Any]]
) -> None:
    """Both serve the first turn under one ``cache_key``; the second turn must
    reuse as many cached tokens on each (some) and give the same tokens."""
    turn = {"cmd": "chat", "messages": chat, "max_tokens": 8, "cache_key": "conv"}
    for w in (worker, baseline):
        w.request({**turn, "id": "t1"})
    second = {
        **turn,
        "messages": [
            *chat,
            {"role": "assistant", "content": "Red."},
            {"role": "user", "content": "More."},
        ],
    }
    want = baseline.request({**second, "id": "t2"})
    got = worker.request({**second, "id": "t2"})
    assert got[-1]["cached_tokens"] == want[-1]["cached_tokens"] > 0
    assert token_ids(got) == token_ids(want)
