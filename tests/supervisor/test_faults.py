"""Every mock_worker fault ends in the right typed error, in time, with nothing left behind."""

from __future__ import annotations

import logging
import os
import signal
import time

import pytest

from protocol.errors import OutOfMemory
from supervisor import (
    MemoryLimitExceeded,
    ProtocolError,
    RequestError,
    RestartPolicy,
    Worker,
    WorkerClosed,
    WorkerCrashed,
    WorkerTimeout,
)
from tests.supervisor.conftest import mock_worker, python_worker

pytestmark = pytest.mark.timeout(30)


def test_slow_token_hits_the_request_timeout_and_the_worker_lives_on() -> None:
    with mock_worker() as w:
        started = time.perf_counter()
        with pytest.raises(WorkerTimeout) as caught:
            list(w.generate("a", max_tokens=5, timeout=0.2, extra={"mock": {"token_delay": 1.0}}))
        assert time.perf_counter() - started < 1.0
        assert caught.value.timeout == 0.2 and "cancelled" in str(caught.value)
        assert list(w.generate("b", max_tokens=2, timeout=1.0))  # same worker, still fine
        assert w.restarts == 0


def test_token_delay_flag_slows_every_token() -> None:
    with mock_worker("--token-delay", "0.02") as w:
        started = time.perf_counter()
        assert len(list(w.generate("a", max_tokens=5))) == 5
        assert time.perf_counter() - started >= 0.1


def test_slow_hello_hits_the_start_timeout() -> None:
    started = time.perf_counter()
    with pytest.raises(WorkerTimeout, match="did not answer hello within 0.3 s"):
        mock_worker("--hello-delay", "5", start_timeout=0.3)
    assert time.perf_counter() - started < 2.0


def test_crash_ends_the_stream_with_exit_code_and_stderr_tail() -> None:
    with mock_worker() as w:
        stream = w.generate(
            "a b", max_tokens=100, extra={"mock": {"crash_after": 3, "exit_code": 7}}
        )
        got = []
        with pytest.raises(WorkerCrashed) as caught:
            for token in stream:
                got.append(token.text)
        assert got == ["a", " b", " a"]  # what came before the death
        crash = caught.value
        assert crash.exit_code == 7 and crash.signal is None
        assert "crash_after=3" in crash.stderr_tail
        assert "exit code 7" in str(crash)
        with pytest.raises(WorkerCrashed):  # no restart policy: the worker stays dead
            w.ping()


def test_crash_flag_and_every_stream_in_flight_fails() -> None:
    with mock_worker("--crash-after", "2", "--exit-code", "3") as w:
        first = w.generate("a", max_tokens=10)
        queued = w.generate("b", max_tokens=10)
        info_error = None
        for stream in (first, queued):
            with pytest.raises(WorkerCrashed) as caught:
                list(stream)
            info_error = caught.value
        assert info_error is not None and info_error.exit_code == 3


def test_death_is_noticed_within_100_ms() -> None:
    with mock_worker("--token-delay", "0.01") as w:
        stream = w.generate("a", max_tokens=100_000)
        next(stream)
        os.kill(w.pid, signal.SIGKILL)
        killed = time.perf_counter()
        with pytest.raises(WorkerCrashed) as caught:
            list(stream)
        noticed = time.perf_counter() - killed
        assert caught.value.signal == signal.SIGKILL
        assert noticed < 0.1, f"crash noticed after {noticed * 1000:.0f} ms"


def test_hang_times_out_then_the_worker_is_killed_and_restarted() -> None:
    policy = RestartPolicy(max_restarts=2, window_s=60)
    with mock_worker(restart=policy, cancel_grace=0.3) as w:
        old_pid = w.pid
        stream = w.generate("a", max_tokens=100, timeout=0.3, extra={"mock": {"hang_after": 2}})
        started = time.perf_counter()
        with pytest.raises(WorkerTimeout, match="worker was killed") as caught:
            list(stream)
        assert time.perf_counter() - started < 2.0
        assert caught.value.timeout == 0.3
        w.ping()  # waits for the restart
        assert w.pid != old_pid and w.restarts == 1
        assert w.model is not None and w.model.path == "mock-model"
        assert len(list(w.generate("back", max_tokens=3))) == 3  # the model was reloaded


def test_hang_with_a_non_streaming_request_times_out() -> None:
    with mock_worker("--load-delay", "5", model=None, cancel_grace=0.2) as w:
        with pytest.raises(WorkerTimeout):
            w.load("slow", timeout=0.2)
        with pytest.raises(WorkerCrashed, match="killed by the supervisor"):
            w.ping()


def test_garbage_line_fails_the_streams_in_flight_but_keeps_the_worker() -> None:
    with mock_worker() as w:
        stream = w.generate("a", max_tokens=100, extra={"mock": {"garbage_after": 2}})
        queued = w.generate("b", max_tokens=3)
        with pytest.raises(ProtocolError, match="not JSON") as caught:
            list(stream)
        assert caught.value.line == b"this is not json"
        with pytest.raises(ProtocolError):
            list(queued)
        assert w.ping() < 1.0
        assert [t.text for t in w.generate("c d", max_tokens=2)] == ["c", " d"]


def test_stderr_flood_does_not_block() -> None:
    started = time.perf_counter()
    with mock_worker("--stderr-flood", "2M") as w:
        flood = {"mock": {"stderr_flood": 10 << 20}}
        assert len(list(w.generate("a", max_tokens=3, extra=flood))) == 3
        child = w._sup.child
        assert child is not None
        deadline = time.monotonic() + 5
        while child.stderr.total_bytes < (12 << 20) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert child.stderr.total_bytes >= 12 << 20
        tail = child.stderr.tail
        assert 0 < len(tail.encode()) <= 8192 and "stderr flood line" in tail
    assert time.perf_counter() - started < 5


def test_stderr_is_forwarded_to_logging(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="supervisor.worker")
    with mock_worker("--stderr-flood", "20K") as w:
        pid = w.pid
    forwarded = [r for r in caplog.records if r.name == "supervisor.worker"]
    assert len(forwarded) >= 150
    assert (
        forwarded[0]
        .getMessage()
        .startswith(f"[worker {pid}] mock_worker WARNING: stderr flood line")
    )


def test_failed_load_is_a_request_error() -> None:
    with mock_worker(model=None) as w:
        with pytest.raises(RequestError) as caught:
            w.load("big", extra={"mock": {"fail_load": "out_of_memory"}})
        assert caught.value.code == "out_of_memory" and isinstance(caught.value.error, OutOfMemory)
        assert w.model is None
        w.load("small")


def test_failed_model_at_start_leaves_nothing_behind() -> None:
    with pytest.raises(RequestError, match="load_failed"):
        mock_worker("--fail-load", "load_failed")


def test_ignored_cancel_kills_the_hung_worker() -> None:
    with mock_worker("--token-delay", "0.01", cancel_grace=0.3) as w:
        stream = w.generate("a", max_tokens=10_000, extra={"mock": {"ignore_cancel": True}})
        next(stream)
        started = time.perf_counter()
        with pytest.raises(WorkerTimeout, match="taken for hung"):
            stream.cancel()
        assert time.perf_counter() - started < 1.5
        with pytest.raises(WorkerTimeout):
            list(stream)
        with pytest.raises(WorkerCrashed, match="killed by the supervisor"):
            w.ping()


def test_ignored_cancel_on_leaving_the_block_raises_worker_timeout() -> None:
    with mock_worker("--token-delay", "0.01", "--ignore-cancel", cancel_grace=0.2) as w:
        with pytest.raises(WorkerTimeout), w.generate("a", max_tokens=10_000) as stream:
            next(stream)


def test_quit_silently_still_closes_cleanly() -> None:
    w = mock_worker("--quit-silently", "--token-delay", "0.01")
    stream = w.generate("a", max_tokens=10_000)
    next(stream)
    started = time.perf_counter()
    w.close()
    assert time.perf_counter() - started < 0.5
    assert w.returncode == 0
    with pytest.raises(WorkerClosed):
        list(stream)


def test_early_exit_at_start_up_is_a_crash_with_the_stderr_tail() -> None:
    source = "import sys; sys.stderr.write('boom: bad configuration\\n'); sys.exit(3)"
    started = time.perf_counter()
    with pytest.raises(WorkerCrashed) as caught:
        python_worker(source)
    assert time.perf_counter() - started < 2.0
    assert caught.value.exit_code == 3
    assert "boom: bad configuration" in caught.value.stderr_tail


def test_a_command_that_cannot_run_is_a_crash() -> None:
    with pytest.raises(WorkerCrashed, match="could not start"):
        Worker(["/nonexistent/worker"])


def test_restart_policy_reloads_the_model_and_the_storm_guard_gives_up() -> None:
    policy = RestartPolicy(max_restarts=2, window_s=60)
    crash = {"mock": {"crash_after": 1}}
    with mock_worker(restart=policy) as w:
        pids = {w.pid}
        for restarts in (1, 2):
            with pytest.raises(WorkerCrashed):
                list(w.generate("a", max_tokens=5, extra=crash))
            w.ping()  # after the restart
            pids.add(w.pid)
            assert w.restarts == restarts
            assert [t.text for t in w.generate("back", max_tokens=1)] == ["back"]
        assert len(pids) == 3
        with pytest.raises(WorkerCrashed):
            list(w.generate("a", max_tokens=5, extra=crash))
        with pytest.raises(WorkerCrashed, match="gave up restarting: 2 restart"):
            w.ping()


@pytest.mark.parametrize("pause", [0.0, 0.3], ids=["kill-in-stream", "kill-before-generate"])
def test_memory_limit_fails_the_stream_then_kills_the_worker(pause: float) -> None:
    """The watcher's kill falls while the stream runs, or (``pause``) before
    ``generate`` is even called, or on a loaded machine during the load:
    whichever, every request from the kill on raises ``MemoryLimitExceeded``."""
    with mock_worker(
        "--token-delay", "0.01", model=None, memory_limit_bytes=1, memory_poll_interval=0.05
    ) as w:
        with pytest.raises(MemoryLimitExceeded) as caught:
            w.load("mock-model")
            time.sleep(pause)
            list(w.generate("a", max_tokens=10_000))
        assert caught.value.limit_bytes == 1 and caught.value.rss_bytes > 1
        for _ in range(2):  # the cause of death is remembered
            with pytest.raises(MemoryLimitExceeded, match="over the limit .* killed it"):
                w.ping()
        assert w.returncode == -signal.SIGKILL
