"""A generation's output, at the seam: engine steps in, the bytes of a job out.

The token fast path (``Job.write`` with :class:`protocol.codec.TokenLines`,
batched per scheduler step by :class:`~bridge.loop.generation.LineBatch`)
must write exactly what the general path (``Job.send`` of a ``TokenEvent``)
writes, each step's tokens before the next step, and nothing after the
terminal line. No model: these run without MLX.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence

import orjson
import pytest

from bridge.engines.engine_protocol import Prepared, ShouldAbort, Step
from bridge.loop.generation import Generation, LineBatch
from bridge.loop.jobs import Job
from protocol.codec import encode
from protocol.replies import Reply, TopLogprob
from protocol.requests import Generate, GenerationRequest, parse_request

pytestmark = pytest.mark.timeout(10)

TOP = (TopLogprob(token_id=9, token=" b", logprob=-0.5),)
STEPS = (
    Step(text="a", token_id=1),
    Step(text=" b", token_id=2, logprob=-0.25, top_logprobs=TOP),
    Step(text=" c\ud800", token_id=3),
    Step(text=" STOP here", token_id=4),
    Step(text=" d", token_id=5, finish_reason="length"),
)


class FakeEngine:
    """Yields ``steps``; records how many lines were out when each step was asked for."""

    def __init__(self, steps: Sequence[Step], out: list[bytes]) -> None:
        self.steps = steps
        self.out = out
        self.seen: list[int] = []

    def prepare(self, request: GenerationRequest) -> Prepared:
        return Prepared(tokens=(1, 2, 3), sampling=request.sampling)

    def generate(
        self, prepared: Prepared, should_abort: ShouldAbort
    ) -> Generator[Step, None, None]:
        for step in self.steps:
            if should_abort():
                return
            self.seen.append(len(self.out))
            yield step


def run(request: Generate, steps: Sequence[Step], *, fast: bool) -> tuple[list[bytes], FakeEngine]:
    out: list[bytes] = []

    def send(reply: Reply) -> None:
        out.append(encode(reply))

    engine = FakeEngine(steps, out)
    job = Job(request=request, send=send, write=out.append if fast else None)
    drive(engine, job)
    return out, engine


def drive(engine: FakeEngine, job: Job) -> None:
    """What the scheduler does for one sequence: step, flush the step's lines, finish."""
    assert isinstance(job.request, Generate)
    prepared = engine.prepare(job.request)
    lines = LineBatch(job.write) if job.write is not None else None
    generation = Generation(
        job, prepared, parser=None, lines=lines, admitted_at=time.perf_counter()
    )
    reason = "cancelled"
    for step in engine.generate(prepared, job.cancel_check):
        ended = generation.step(step)
        if lines is not None:
            lines.flush()
        if ended is not None:
            reason = ended
            break
    generation.finish(reason)


def generate(**fields: object) -> Generate:
    request = parse_request({"cmd": "generate", "prompt": "x", **fields})
    assert isinstance(request, Generate)
    return request


@pytest.mark.parametrize(
    "fields",
    [{"id": 7}, {"id": "s"}, {}, {"id": 1, "stop": ["STOP"]}, {"id": 2, "stop": ["zzz"]}],
    ids=["int-id", "str-id", "legacy", "stop-hit", "stop-held"],
)
def test_the_fast_path_writes_the_same_bytes(fields: dict[str, object]) -> None:
    fast, _ = run(generate(**fields), STEPS, fast=True)
    slow, _ = run(generate(**fields), STEPS, fast=False)
    # ``done`` differs only in its timings; every token line is identical
    assert fast[:-1] == slow[:-1]
    assert orjson.loads(fast[-1])["type"] == "done"


def test_each_token_is_written_before_the_next_step_is_asked_for() -> None:
    out, engine = run(generate(id=1), STEPS, fast=True)
    assert engine.seen == [0, 1, 2, 3, 4]
    assert len(out) == 6


def test_stop_strings_hold_back_until_it_is_safe() -> None:
    out, _ = run(generate(id=1, stop=["zzz"]), STEPS, fast=True)
    texts = [orjson.loads(line).get("token") for line in out[:-1]]
    written = "".join(s.text for s in STEPS).replace("\ud800", "\ufffd")
    assert "".join(texts) == written
    assert orjson.loads(out[-1])["finish_reason"] == "length"


def test_nothing_is_written_after_the_terminal_line() -> None:
    out: list[bytes] = []
    job = Job(request=generate(id=1), send=lambda r: out.append(encode(r)), write=out.append)
    job.emit_line(b"first\n")
    assert job.finish_cancelled()
    job.emit_line(b"late\n")
    assert out[0] == b"first\n" and len(out) == 2
    assert orjson.loads(out[1])["finish_reason"] == "cancelled"


def test_a_cancelled_job_stops_at_the_next_step() -> None:
    out: list[bytes] = []
    job = Job(request=generate(id=1), send=lambda r: out.append(encode(r)), write=out.append)
    job.cancel()
    drive(FakeEngine(STEPS, out), job)
    assert [orjson.loads(line)["type"] for line in out] == ["done"]


def test_a_step_s_lines_skip_a_request_that_ended_meanwhile() -> None:
    """Shutdown may fail a stuck request from another thread while its token
    line waits in the step's batch: the line is dropped, the others written."""
    out: list[bytes] = []
    lines = LineBatch(out.append)
    ended = Job(request=generate(id=1), send=lambda r: out.append(encode(r)), write=out.append)
    alive = Job(request=generate(id=2), send=lambda r: out.append(encode(r)), write=out.append)
    lines.add(ended, b"late\n")
    lines.add(alive, b"kept\n")
    assert ended.finish_cancelled()
    lines.flush()
    assert out[-1] == b"kept\n" and b"late\n" not in out
