"""BatchScheduler over the scripted engine, in process: terminal lines and the figures of ``info``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import pytest

from bridge.engines.engine_protocol import Decoder, Event, Failed, Prepared, SeqId, ShouldAbort
from bridge.loop.jobs import Job, QueuedRequest
from bridge.loop.scheduler import BatchScheduler
from mock_worker.engine import ScriptedEngine
from mock_worker.faults import Faults
from protocol.errors import Internal
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


@contextmanager
def loaded(engine: ScriptedEngine) -> Iterator[BatchScheduler]:
    """A scheduler over ``engine`` with its (scripted) model loaded; shut down after."""
    s = BatchScheduler(engine)
    s.start()
    s.release_warm_up()
    try:
        assert run(s, Load(id="load", path="mock")).ended.wait(5.0)
        yield s
    finally:
        assert s.shutdown(5.0)


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


class FailingAdds(ScriptedEngine):
    """A scripted engine whose decoder fails to take a sequence when told to."""

    def __init__(self) -> None:
        super().__init__(faults=Faults(token_delay=0.02))
        self.fail_next = False

    def decoder(self) -> Decoder:
        return _FailingDecoder(super().decoder(), self)


class _FailingDecoder:
    def __init__(self, inner: Decoder, engine: FailingAdds) -> None:
        self._inner = inner
        self._engine = engine
        self.capacity = inner.capacity
        self.kv = inner.kv

    def add(self, seq: SeqId, prepared: Prepared, *, should_abort: ShouldAbort) -> int:
        if self._engine.fail_next:
            self._engine.fail_next = False
            raise RuntimeError("the batch could not take it")
        return self._inner.add(seq, prepared, should_abort=should_abort)

    def remove(self, seq: SeqId) -> None:
        self._inner.remove(seq)

    def step(self) -> Sequence[Event]:
        return self._inner.step()

    def peak_memory(self) -> int:
        return self._inner.peak_memory()

    def close(self) -> None:
        self._inner.close()


def test_a_decoder_that_fails_to_add_ends_every_running_request_and_recovers() -> None:
    """A failed admission may leave the decoder half-changed: the running
    requests end with ``internal`` too, and the next request gets a fresh decoder."""
    engine = FailingAdds()
    with loaded(engine) as s:
        first = run(s, Generate(id="a", prompt="a b c", sampling=Sampling(max_tokens=10_000)))
        wait_for(lambda: any(isinstance(r, TokenEvent) for r in first.lines))
        engine.fail_next = True
        second = run(s, Generate(id="b", prompt="d e", sampling=Sampling(max_tokens=3)))
        assert first.ended.wait(5.0) and second.ended.wait(5.0)
        for replies in (first, second):
            assert getattr(replies.lines[-1], "code", None) == "internal"
        third = run(s, Generate(id="c", prompt="f g", sampling=Sampling(max_tokens=3)))
        assert third.ended.wait(5.0)
        done = third.lines[-1]
        assert isinstance(done, Done) and done.finish_reason == "length"


class FailingOne(FailingAdds):
    """A scripted engine whose decoder reports, when told to, that the
    sequence it names failed on its own (as a vision solo lane does)."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_seq: SeqId | None = None
        self.made: _FailingOneDecoder | None = None

    def decoder(self) -> Decoder:
        self.made = _FailingOneDecoder(ScriptedEngine.decoder(self), self)
        return self.made


class _FailingOneDecoder(_FailingDecoder):
    def __init__(self, inner: Decoder, engine: FailingOne) -> None:
        super().__init__(inner, engine)
        self._one = engine
        self.seqs: list[SeqId] = []

    def add(self, seq: SeqId, prepared: Prepared, *, should_abort: ShouldAbort) -> int:
        self.seqs.append(seq)
        return self._inner.add(seq, prepared, should_abort=should_abort)

    def step(self) -> Sequence[Event]:
        seq = self._one.fail_seq
        if seq is None:
            return self._inner.step()
        self._one.fail_seq = None
        self._inner.remove(seq)
        return [*self._inner.step(), Failed(seq=seq, error=Internal("decode failed: boom"))]


def test_a_sequence_that_fails_alone_ends_only_its_request() -> None:
    engine = FailingOne()
    with loaded(engine) as s:
        first = run(s, Generate(id="a", prompt="a b c", sampling=Sampling(max_tokens=40)))
        second = run(s, Generate(id="b", prompt="d e", sampling=Sampling(max_tokens=10_000)))
        wait_for(lambda: any(isinstance(r, TokenEvent) for r in second.lines))
        assert engine.made is not None
        engine.fail_seq = engine.made.seqs[1]
        assert second.ended.wait(5.0)
        assert getattr(second.lines[-1], "code", None) == "internal"
        assert first.ended.wait(10.0)
        done = first.lines[-1]
        assert isinstance(done, Done) and done.finish_reason == "length"
        wait_for(lambda: s.stats().running == 0)
