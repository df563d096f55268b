"""The engine thread's warm-up waits for the host's first line (or a silence),
so that importing MLX, which holds the GIL, never delays the first answer."""

from __future__ import annotations

import threading
import time

import pytest

from bridge.loop import scheduler as scheduler_module
from bridge.loop.scheduler import BatchScheduler
from mock_worker.engine import ScriptedEngine

pytestmark = pytest.mark.timeout(10)


class RecordingEngine(ScriptedEngine):
    def __init__(self) -> None:
        super().__init__()
        self.warmed = threading.Event()

    def warm_up(self) -> None:
        self.warmed.set()


def test_warm_up_waits_for_the_first_line() -> None:
    engine = RecordingEngine()
    scheduler = BatchScheduler(engine)
    scheduler.start()
    try:
        assert not engine.warmed.wait(0.2)
        scheduler.release_warm_up()
        assert engine.warmed.wait(2.0)
    finally:
        assert scheduler.shutdown(2.0)


def test_warm_up_starts_after_a_silence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scheduler_module, "WARM_UP_IDLE_S", 0.05)
    engine = RecordingEngine()
    scheduler = BatchScheduler(engine)
    started = time.monotonic()
    scheduler.start()
    try:
        assert engine.warmed.wait(2.0)
        assert time.monotonic() - started >= 0.05
    finally:
        assert scheduler.shutdown(2.0)


def test_no_warm_up_when_shut_down_first() -> None:
    engine = RecordingEngine()
    scheduler = BatchScheduler(engine)
    scheduler.start()
    assert scheduler.shutdown(2.0)
    assert not engine.warmed.is_set()
