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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from bridge.engines.engine_protocol import Engine, Step
from bridge.loop.jobs import Job
from bridge.loop.stops import StopFilter
from protocol.codec import TokenLines
from protocol.errors import RequestId
from protocol.replies import Done, TokenEvent, ToolCall
from protocol.requests import Chat, Generate

Emit = Callable[[Step, str], None]


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
    cancelled = job.cancel_check
    filtering = stops.active
    reports = prepared if isinstance(prepared, Reports) else None
    answer: list[str] | None = [] if reports is not None else None
    emit = _emitter(job, request.id, answer)

    steps = engine.generate(prepared, cancelled)
    try:
        for step in steps:
            if first_token_at is None:
                first_token_at = time.perf_counter()
            last = step
            if cancelled():
                break
            if not step.is_eos:
                tokens += 1
            if not step.is_eos or step.text:
                if filtering:
                    for held, text in stops.push(step, step.text):
                        emit(held, text)
                else:
                    emit(step, step.text)
            if stops.stopped:
                finish_reason = "stop_sequence"
                break
            if step.finish_reason is not None:
                finish_reason = step.finish_reason
                break
    finally:
        steps.close()
    if not stops.stopped:
        for held, text in stops.flush():
            emit(held, text)
    outcome = reports.outcome("".join(answer or ())) if reports is not None else Outcome()
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


def _emitter(job: Job, request_id: RequestId | None, answer: list[str] | None) -> Emit:
    """Writes one token of the answer (and keeps its text when ``answer`` is
    a list). The hot path: a token without logprobs, on a job with a line
    writer, is encoded straight to bytes, without a ``TokenEvent``."""
    lines = TokenLines(request_id) if job.write is not None else None
    emit_line = job.emit_line

    def emit(step: Step, text: str) -> None:
        if answer is not None:
            answer.append(text)
        if lines is not None and step.logprob is None and step.top_logprobs is None:
            emit_line(lines(text, step.token_id))
        else:
            job.emit(
                TokenEvent(
                    id=request_id,
                    token=text,
                    token_id=step.token_id,
                    logprob=step.logprob,
                    top_logprobs=step.top_logprobs,
                )
            )

    return emit
