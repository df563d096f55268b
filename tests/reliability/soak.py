"""A bounded soak through the supervisor: many concurrent streams, random cancels, one real worker.

``soak`` starts ``python -m bridge`` with the tiny model through
``supervisor.Worker`` (threads) or ``AsyncWorker`` (tasks), records each
prompt's greedy answer alone first (the reference, which also warms the
worker up), runs a warm-up round, and then the measured round: ``requests``
generations of random lengths over ``concurrency`` concurrent streams, a
fraction of them cancelled after a random number of tokens (0: right after
sending, often while queued).

Every stream must end with its result (nothing lost: no exception, no
timeout), and its token ids must be its own prompt's greedy answer: all of
it, or for a cancelled stream a prefix of it (nothing misrouted: the prompts
all differ, so another stream's tokens would not match). The worker's RSS
after the warm-up round is compared with its RSS at the end.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from supervisor import AsyncWorker, SupervisorError, Worker
from tests.harness import ROOT

OPTIONS: dict[str, Any] = {
    "env": {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
    "cwd": ROOT,
    "start_timeout": 60.0,
    "request_timeout": 120.0,
}
TOPICS = ("river", "castle", "robot", "garden", "comet", "library", "harbor", "violin")
PROMPTS = tuple(f"Story {i} about a {topic}:" for i, topic in enumerate(TOPICS * 6))


@dataclass(frozen=True, slots=True)
class Job:
    prompt: str
    max_tokens: int
    cancel_at: int | None  # cancel after this many tokens (None: never)


@dataclass
class SoakReport:
    kind: str
    requests: int = 0
    completed: int = 0
    cancels_sent: int = 0
    cancelled: int = 0
    lost: int = 0
    misrouted: int = 0
    tokens: int = 0
    rss_warm_bytes: int = 0
    rss_end_bytes: int = 0
    duration_s: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def rss_growth(self) -> float:
        return (self.rss_end_bytes - self.rss_warm_bytes) / self.rss_warm_bytes

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["rss_growth"] = round(self.rss_growth, 4)
        out["problems"] = self.problems[:20]
        return out


def jobs(n: int, *, seed: int, max_tokens: int, cancel_rate: float) -> list[Job]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        m = rng.randint(1, max_tokens)
        cancel_at = rng.randrange(0, m) if rng.random() < cancel_rate else None
        out.append(Job(rng.choice(PROMPTS), m, cancel_at))
    return out


class _Tally:
    def __init__(self, report: SoakReport, reference: dict[str, list[int]]) -> None:
        self.report = report
        self.reference = reference
        self.lock = threading.Lock()

    def record(self, job: Job, got: Sequence[int], finish: str | None, error: str | None) -> None:
        r = self.report
        with self.lock:
            r.requests += 1
            r.tokens += len(got)
            r.cancels_sent += job.cancel_at is not None
            if error is not None or finish is None:
                r.lost += 1
                r.problems.append(f"lost: {job}: {error}")
                return
            want = self.reference[job.prompt][: job.max_tokens]
            if finish == "cancelled":
                r.cancelled += 1
            else:
                r.completed += 1
            if job.cancel_at is None:
                ok = list(got) == want
            else:  # the host stopped reading at its cancel, even if the stream had ended by then
                ok = list(got) == want[: len(got)] and (
                    finish == "cancelled" or len(got) >= job.cancel_at
                )
            if not ok:
                r.misrouted += 1
                r.problems.append(f"misrouted: {job} ({finish}): got {list(got)}, want {want}")


def _sync_one(w: Worker, job: Job, tally: _Tally) -> None:
    got: list[int] = []
    try:
        with w.generate(job.prompt, max_tokens=job.max_tokens) as stream:
            if job.cancel_at == 0:
                stream.cancel()
            for token in stream:
                got.append(token.token_id)
                if job.cancel_at is not None and len(got) >= job.cancel_at:
                    stream.cancel()
                    break
        tally.record(job, got, stream.result.finish_reason, None)
    except SupervisorError as exc:
        tally.record(job, got, None, repr(exc))


async def _async_one(w: AsyncWorker, job: Job, tally: _Tally) -> None:
    got: list[int] = []
    try:
        async with w.generate(job.prompt, max_tokens=job.max_tokens) as stream:
            if job.cancel_at == 0:
                await stream.cancel()
            async for token in stream:
                got.append(token.token_id)
                if job.cancel_at is not None and len(got) >= job.cancel_at:
                    await stream.cancel()
                    break
        tally.record(job, got, stream.result.finish_reason, None)
    except SupervisorError as exc:
        tally.record(job, got, None, repr(exc))


def soak(
    model: Path,
    *,
    requests: int,
    kind: str = "sync",
    concurrency: int = 16,
    cancel_rate: float = 0.2,
    max_tokens: int = 24,
    warmup: int = 100,
    seed: int = 0,
) -> SoakReport:
    """Run the soak (see the module docstring); ``kind`` is ``sync`` or ``async``."""
    warm = jobs(warmup, seed=seed + 1, max_tokens=max_tokens, cancel_rate=cancel_rate)
    measured = jobs(requests, seed=seed, max_tokens=max_tokens, cancel_rate=cancel_rate)
    if kind == "sync":
        return _soak_sync(model, warm, measured, concurrency, max_tokens)
    return asyncio.run(_soak_async(model, warm, measured, concurrency, max_tokens))


def _rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def _soak_sync(
    model: Path, warm: list[Job], measured: list[Job], concurrency: int, max_tokens: int
) -> SoakReport:
    with Worker(model=model, **OPTIONS) as w:
        reference = {p: [t.token_id for t in w.generate(p, max_tokens=max_tokens)] for p in PROMPTS}
        with ThreadPoolExecutor(concurrency) as pool:
            scratch = _Tally(SoakReport("sync"), reference)
            list(pool.map(lambda job: _sync_one(w, job, scratch), warm))
            report = SoakReport("sync", rss_warm_bytes=_rss(w.pid))
            tally = _Tally(report, reference)
            started = time.perf_counter()
            list(pool.map(lambda job: _sync_one(w, job, tally), measured))
            report.duration_s = round(time.perf_counter() - started, 2)
        report.rss_end_bytes = _rss(w.pid)
        report.problems[:0] = scratch.report.problems  # the warm-up must be clean too
        report.lost += scratch.report.lost
        report.misrouted += scratch.report.misrouted
    return report


async def _soak_async(
    model: Path, warm: list[Job], measured: list[Job], concurrency: int, max_tokens: int
) -> SoakReport:
    async with AsyncWorker(model=model, **OPTIONS) as w:
        reference = {}
        for p in PROMPTS:
            reference[p] = [t.token_id async for t in w.generate(p, max_tokens=max_tokens)]
        gate = asyncio.Semaphore(concurrency)

        async def gated(job: Job, tally: _Tally) -> None:
            async with gate:
                await _async_one(w, job, tally)

        scratch = _Tally(SoakReport("async"), reference)
        await asyncio.gather(*(gated(job, scratch) for job in warm))
        report = SoakReport("async", rss_warm_bytes=_rss(w.pid))
        tally = _Tally(report, reference)
        started = time.perf_counter()
        await asyncio.gather(*(gated(job, tally) for job in measured))
        report.duration_s = round(time.perf_counter() - started, 2)
        report.rss_end_bytes = _rss(w.pid)
    report.problems[:0] = scratch.report.problems
    report.lost += scratch.report.lost
    report.misrouted += scratch.report.misrouted
    return report
