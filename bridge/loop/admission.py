"""Whether one more sequence fits the batch: the scheduler's decision, free of I/O.

A sequence needs KV-cache room for its prompt plus ``max_tokens``; a batch
whose rows share one length (mlx-lm's left-padded ``BatchKVCache``) takes
``rows × longest row`` tokens. A sequence waits while the batch is full or
the KV caches would pass the budget, and is refused only when it cannot fit
even alone. The byte figures come from the engine (:class:`KvShape`).
"""

from __future__ import annotations

from collections.abc import Collection
from enum import Enum

from bridge.engines.engine_protocol import KvShape


class Verdict(Enum):
    ADMIT = "admit"
    WAIT = "wait"
    NEVER = "never"


def kv_bytes(rows: Collection[int], kv: KvShape) -> int:
    """Bytes the KV caches of ``rows`` (each a sequence's most tokens) take."""
    if not rows or not kv.bytes_per_token:
        return 0
    tokens = len(rows) * max(rows) if kv.padded else sum(rows)
    return tokens * kv.bytes_per_token


def admit(running: Collection[int], new: int, *, capacity: int, kv: KvShape) -> Verdict:
    """Whether a sequence of ``new`` tokens joins ``running`` (their tokens)."""
    if kv.budget is not None and kv_bytes((new,), kv) > kv.budget:
        return Verdict.NEVER
    if len(running) >= capacity:
        return Verdict.WAIT
    if kv.budget is not None and running and kv_bytes([*running, new], kv) > kv.budget:
        return Verdict.WAIT
    return Verdict.ADMIT
