"""Run one generation job: engine steps in, token lines and one ``done`` out.

This is where stop strings, cancel checks, and timing live, so that every
engine (real or scripted) streams with identical semantics.

An engine may add to ``done`` through its prepared request: a ``Prepared``
that also has an ``outcome(answer)`` method (:class:`Reports`) is asked, once
the answer is complete, for the prompt-cache hit and the tool calls parsed
out of the answer. Engines without one (the scripted engine) report neither.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from protocol.replies import Done, TokenEvent, ToolCall
from protocol.requests import Chat, Generate

from .engine import Engine, Step
from .jobs import Job
from .stops import StopFilter


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """What an engine adds to ``done``: see :class:`protocol.replies.Done`."""

    cached_tokens: int = 0
    tool_calls: tuple[ToolCall, ...] | None = None
    content: str | None = None


@runtime_checkable
class Reports(Protocol):
    def outcome(self, answer: str) -> Outcome:
        """Called after the engine's steps have ended, with the text that was
        written (stop strings removed)."""
        ...


def run_generation(engine: Engine, job: Job) -> None:
    request = job.request
    assert isinstance(request, Generate | Chat)
    prepared = engine.prepare(request)
    stops: StopFilter[Step] = StopFilter(prepared.sampling.stop)
    finish_reason = "cancelled"
    tokens = 0
    last: Step | None = None
    first_token_at: float | None = None

    answer: list[str] = []

    def emit(ready: list[tuple[Step, str]]) -> None:
        for step, text in ready:
            answer.append(text)
            job.emit(
                TokenEvent(
                    id=request.id,
                    token=text,
                    token_id=step.token_id,
                    logprob=step.logprob,
                    top_logprobs=step.top_logprobs,
                )
            )

    steps = engine.generate(prepared, lambda: job.cancelled)
    try:
        for step in steps:
            if first_token_at is None:
                first_token_at = time.perf_counter()
            last = step
            if job.cancelled:
                break
            if not step.is_eos:
                tokens += 1
            if not step.is_eos or step.text:
                emit(stops.push(step, step.text))
            if stops.stopped:
                finish_reason = "stop_sequence"
                break
            if step.finish_reason is not None:
                finish_reason = step.finish_reason
                break
    finally:
        steps.close()
    if not stops.stopped:
        emit(stops.flush())
    outcome = prepared.outcome("".join(answer)) if isinstance(prepared, Reports) else Outcome()
    job.finish(
        Done(
            id=request.id,
            finish_reason=finish_reason,
            tokens_generated=tokens,
            prompt_tokens=len(prepared.tokens),
            prompt_tps=last.prompt_tps if last else 0.0,
            generation_tps=last.generation_tps if last else 0.0,
            ttft_ms=None
            if first_token_at is None
            else (first_token_at - (job.started_at or job.received_at)) * 1000.0,
            queue_ms=((job.started_at or job.received_at) - job.received_at) * 1000.0,
            peak_memory_bytes=last.peak_memory_bytes if last else 0,
            cached_tokens=outcome.cached_tokens,
            tool_calls=outcome.tool_calls,
            content=outcome.content,
        )
    )
