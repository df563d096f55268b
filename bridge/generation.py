"""Run one generation job: engine steps in, token lines and one ``done`` out.

This is where stop strings, cancel checks, and timing live, so that every
engine (real or scripted) streams with identical semantics.
"""

from __future__ import annotations

import time

from protocol.replies import Done, TokenEvent
from protocol.requests import Chat, Generate

from .engine import Engine, Step
from .jobs import Job
from .stops import StopFilter


def run_generation(engine: Engine, job: Job) -> None:
    request = job.request
    assert isinstance(request, Generate | Chat)
    prepared = engine.prepare(request)
    stops: StopFilter[Step] = StopFilter(prepared.sampling.stop)
    finish_reason = "cancelled"
    tokens = 0
    last: Step | None = None
    first_token_at: float | None = None

    def emit(ready: list[tuple[Step, str]]) -> None:
        for step, text in ready:
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
        )
    )
