"""One generation request's state while it runs: steps in, token lines and one ``done`` out.

A :class:`Generation` is the request loop's object per request: stop strings,
counts, timings and the answer's text live here, not in a generator's
locals, so that the scheduler can step many at once and route each engine
event to its request. Every engine (batched, one at a time, scripted)
streams through it with identical semantics.

Timings are the request's own, not its batch's: ``queue_ms`` from receipt to
admission, ``ttft_ms`` from admission to the first token, ``prompt_tps`` the
prompt tokens it fed (cached ones excluded) over that time, and
``generation_tps`` its tokens after the first over the time they took.

Token lines of one scheduler step are written together: ``emit`` appends to
the step's :class:`LineBatch`, which the scheduler flushes once per step
(and before any terminal line, so that a request's tokens always precede
its ``done``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from bridge.engines.engine_protocol import AnswerParser, Prepared, Step
from bridge.loop.jobs import Job
from bridge.loop.stops import StopFilter
from protocol.codec import TokenLines
from protocol.replies import Done, ProgressEvent, TokenEvent
from protocol.requests import Chat, Generate

Write = Callable[[bytes], None]


class LineBatch:
    """Encoded token lines of one scheduler step, written with one call.

    A line whose request has ended by the time of the write (the worker's
    shutdown fails a stuck request from another thread) is dropped, so that
    nothing follows a request's terminal line."""

    __slots__ = ("_lines", "_write")

    def __init__(self, write: Write) -> None:
        self._write = write
        self._lines: list[tuple[Job, bytes]] = []

    def add(self, job: Job, line: bytes) -> None:
        self._lines.append((job, line))

    def flush(self) -> None:
        if self._lines:
            data = b"".join(line for job, line in self._lines if not job.finished)
            self._lines.clear()
            if data:
                self._write(data)


class Generation:
    """A generate/chat request from admission to ``done``."""

    def __init__(
        self,
        job: Job,
        prepared: Prepared,
        *,
        parser: AnswerParser | None,
        lines: LineBatch | None,
        admitted_at: float,
    ) -> None:
        request = job.request
        assert isinstance(request, Generate | Chat)
        self.job = job
        self.prepared = prepared
        self._parser = parser
        self._lines = lines if job.write is not None else None
        self._token_lines = TokenLines(request.id) if self._lines is not None else None
        self._stops: StopFilter[Step] = StopFilter(prepared.sampling.stop)
        self._answer: list[str] | None = [] if parser is not None else None
        self.admitted_at = admitted_at
        self.cached_tokens = 0
        self.tokens = 0
        self.drafted = 0  # answer tokens a draft model proposed and the model accepted
        self._progress = request.progress and request.id is not None
        self._first_at: float | None = None
        self._last_at: float | None = None

    @property
    def cancelled(self) -> bool:
        return self.job.cancelled

    @property
    def started(self) -> bool:
        """Whether its first token has come (it is decoding, not prefilling)."""
        return self._first_at is not None

    # -- events from the engine --------------------------------------------------------

    def prefilled(self, done: int, total: int) -> None:
        rid = self.job.request.id
        if self._progress and rid is not None and not self.job.finished and self._first_at is None:
            self._send_event(ProgressEvent(id=rid, stage="prefill", done=done, total=total))

    def step(self, step: Step) -> str | None:
        """Take one engine step; returns the finish reason once the request
        is over (the caller then removes it from the engine, unless the
        engine ended it, and calls :meth:`finish`)."""
        if self.job.cancelled:  # a token that came after the cancel is not part of it
            return "cancelled"
        now = time.perf_counter()
        if self._first_at is None:
            self._first_at = now
        self._last_at = now
        if not step.is_eos:
            self.tokens += 1
            self.drafted += step.from_draft
        if not step.is_eos or step.text:
            if self._stops.active:
                for held, text in self._stops.push(step, step.text):
                    self._emit(held, text)
            else:
                self._emit(step, step.text)
        if self._stops.stopped:
            return "stop_sequence"
        return step.finish_reason

    def finish(self, reason: str, *, peak_memory: int = 0) -> None:
        """Write what the stop filter holds, then ``done``."""
        if self.job.finished:
            return
        if not self._stops.stopped and reason != "cancelled":
            for held, text in self._stops.flush():
                self._emit(held, text)
        if self._lines is not None:
            self._lines.flush()
        parsed = self._parser("".join(self._answer or ())) if self._parser is not None else None
        job = self.job
        start = job.started_at or self.admitted_at
        first, last = self._first_at, self._last_at
        fed = len(self.prepared.tokens) - self.cached_tokens
        prompt_s = (first - start) if first is not None else 0.0
        decode_s = (last - first) if first is not None and last is not None else 0.0
        job.finish(
            Done(
                id=job.request.id,
                finish_reason=reason,
                tokens_generated=self.tokens,
                prompt_tokens=len(self.prepared.tokens),
                prompt_tps=fed / prompt_s if prompt_s > 0 else 0.0,
                generation_tps=(self.tokens - 1) / decode_s
                if decode_s > 0 and self.tokens > 1
                else 0.0,
                ttft_ms=None if first is None else (first - start) * 1000.0,
                queue_ms=(start - job.received_at) * 1000.0,
                peak_memory_bytes=peak_memory,
                cached_tokens=self.cached_tokens,
                tool_calls=parsed.tool_calls if parsed is not None else None,
                content=parsed.content if parsed is not None else None,
                draft_tokens_accepted=None if self.prepared.draft_tokens is None else self.drafted,
            )
        )

    # -- output -------------------------------------------------------------------------

    def _emit(self, step: Step, text: str) -> None:
        if self._answer is not None:
            self._answer.append(text)
        lines, token_lines = self._lines, self._token_lines
        plain = step.logprob is None and step.top_logprobs is None
        if plain and lines is not None and token_lines is not None:
            lines.add(self.job, token_lines(text, step.token_id))  # dropped if the job ends first
            return
        if lines is not None:
            lines.flush()
        self.job.emit(
            TokenEvent(
                id=self.job.request.id,
                token=text,
                token_id=step.token_id,
                logprob=step.logprob,
                top_logprobs=step.top_logprobs,
            )
        )

    def _send_event(self, event: ProgressEvent) -> None:
        if self._lines is not None:
            self._lines.flush()
        self.job.emit(event)
