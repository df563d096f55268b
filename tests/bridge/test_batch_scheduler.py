"""BatchScheduler over the scripted engine, in process: terminal lines and the figures of ``info``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from bridge.loop.jobs import Job, QueuedRequest
from bridge.loop.scheduler import BatchScheduler
from mock_worker.engine import ScriptedEngine
from mock_worker.faults import Faults
from protocol.replies import Done, ProgressEvent, Reply, TokenEvent
from protocol.requests import Generate, Load, Sampling

pytestmark = pytest.mark.timeout(20)


class Replies:
    """Every reply of one job, and an event set on its terminal line."""

    def __init__(self) -> None:
        self.lines: list[Reply] = []
        self.ended = threading.Event()

    def __call__(self, reply: Reply) -> None:
        self.lines.append(reply)
        if not isinstance(reply, TokenEvent | ProgressEvent):
            self.ended.set()


@pytest.fixture
def scheduler() -> Iterator[BatchScheduler]:
    s = BatchScheduler(ScriptedEngine(faults=Faults(token_delay=0.02)))
    s.start()
    s.release_warm_up()
    run(s, Load(id="load", path="mock"))
    yield s
    assert s.shutdown(5.0)


def run(s: BatchScheduler, request: QueuedRequest) -> Replies:
    replies = Replies()
    s.submit(Job(request=request, send=replies))
    return replies


def wait_for(what: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_stats_forget_a_sequence_cancelled_while_decoding(scheduler: BatchScheduler) -> None:
    replies = run(scheduler, Generate(id="a", prompt="a b c", sampling=Sampling(max_tokens=10_000)))
    wait_for(lambda: sum(isinstance(r, TokenEvent) for r in replies.lines) >= 2)
    assert scheduler.stats().running == 1
    scheduler.cancel("a")
    assert replies.ended.wait(5.0)
    done = replies.lines[-1]
    assert isinstance(done, Done) and done.finish_reason == "cancelled"
    time.sleep(0.1)  # nothing runs now: no later step refreshes the figures
    stats = scheduler.stats()
    assert (stats.running, stats.prefilling, stats.kv_reserved_bytes) == (0, 0, 0)
