"""What the host gets back: token events, a stream's final result, worker stats.

``Token`` is a ``NamedTuple`` rather than a frozen dataclass: it is built once
per generated token on the hot path, and a named tuple is built about three
times faster while being just as immutable and typed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from protocol.replies import Done, MemoryStats, ProgressEvent, ToolCall, TopLogprob

__all__ = ["StreamItem", "StreamResult", "Timings", "Token", "Usage", "WorkerStats"]


class Token(NamedTuple):
    """One generated token. ``text`` may be empty while the worker holds back
    part of a multi-byte character or a possible stop string."""

    text: str
    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[TopLogprob, ...] | None = None


StreamItem = Token | ProgressEvent
"""What a stream sent with ``progress=True`` yields: its tokens, and before
them (during prefill) its :class:`~protocol.replies.ProgressEvent` s, in the
order the worker wrote them. Without ``progress`` a stream yields only
``Token`` s."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Usage:
    """Token counts; ``cached_tokens`` of the prompt came from the prompt cache;
    ``draft_tokens_accepted`` of the completion were a draft model's (None: no
    draft is loaded)."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    draft_tokens_accepted: int | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True, kw_only=True)
class Timings:
    """As the worker measured them. ``ttft_ms`` is None when no token came."""

    ttft_ms: float | None
    prompt_tps: float
    generation_tps: float
    queue_ms: float


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamResult:
    """How a generation ended: ``finish_reason`` is one of ``stop``,
    ``length``, ``stop_sequence`` or ``cancelled``. ``tool_calls`` (with
    ``content``, the answer's text without them) is set when the worker
    parsed tool calls out of a chat answer."""

    finish_reason: str
    usage: Usage
    timings: Timings
    peak_memory_bytes: int
    tool_calls: tuple[ToolCall, ...] | None = None
    content: str | None = None

    @classmethod
    def of(cls, done: Done) -> StreamResult:
        return cls(
            finish_reason=done.finish_reason,
            usage=Usage(
                prompt_tokens=done.prompt_tokens,
                completion_tokens=done.tokens_generated,
                cached_tokens=done.cached_tokens,
                draft_tokens_accepted=done.draft_tokens_accepted,
            ),
            timings=Timings(
                ttft_ms=done.ttft_ms,
                prompt_tps=done.prompt_tps,
                generation_tps=done.generation_tps,
                queue_ms=done.queue_ms,
            ),
            peak_memory_bytes=done.peak_memory_bytes,
            tool_calls=done.tool_calls,
            content=done.content,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerStats:
    """A snapshot of the worker process.

    ``rss_bytes`` and ``cpu_percent`` come from psutil (CPU since the previous
    ``stats()`` call, 0.0 on the first); ``mlx`` is the worker's own ``info``
    memory report, None when no model is loaded.
    """

    pid: int
    rss_bytes: int
    cpu_percent: float
    mlx: MemoryStats | None
