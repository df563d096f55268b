"""``WorkerPool`` over real children: placement, affinity, crashes, close, the real worker."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from supervisor import RestartPolicy, Token, WorkerClosed, WorkerCrashed, WorkerPool
from tests.supervisor.conftest import ENV, FAST, MOCK, ROOT

pytestmark = pytest.mark.timeout(60)

SLOW = {"mock": {"token_delay": 0.05}}  # a stream that stays open while the test looks
LONG = 100_000


def mock_pool(*flags: str, model: str | None = "mock-model", **options: Any) -> WorkerPool:
    """A ``WorkerPool`` of ``python -m mock_worker FLAGS`` members, model loaded."""
    env = ENV | options.pop("env", {})
    return WorkerPool([*MOCK, *flags], model=model, **(FAST | {"env": env, "cwd": ROOT} | options))


def eventually(check: Callable[[], bool], within: float = 20.0) -> None:
    """Poll ``check`` until true (generous: the machine may be loaded)."""
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_affinity_sticks_and_others_go_to_the_idle_member() -> None:
    with mock_pool(members=2) as pool:
        assert len(set(pool.pids)) == 2
        a = pool.generate("conversation a", cache_key="a", max_tokens=LONG, extra=SLOW)
        b = pool.generate("conversation b", cache_key="b", max_tokens=LONG, extra=SLOW)
        assert (pool.placement.affinity("a"), pool.placement.affinity("b")) == (0, 1)
        assert [m.outstanding for m in pool.stats().members] == [1, 1]
        with a, b:
            assert next(a).text == "conversation" and next(b).text == "conversation"
            b.close()
            # member 0 is busier, but conversation a goes back to it
            again = pool.generate("more of a", cache_key="a", max_tokens=LONG, extra=SLOW)
            with again:
                assert pool.stats().members[0].outstanding == 2
                assert [next(again).text for _ in range(3)] == ["more", " of", " a"]
            assert again.result.finish_reason == "cancelled"
            # a third conversation goes to the idle member, and sticks there
            third = pool.chat([{"role": "user", "content": "c"}], cache_key="c", max_tokens=2)
            assert pool.placement.affinity("c") == 1
            assert third.text() == "c c"
        assert a.result.finish_reason == b.result.finish_reason == "cancelled"
        stats = pool.stats()
        assert stats.outstanding == 0 and stats.tokens_in_flight == 0
        assert [m.worker.pid for m in stats.members if m.worker] == list(pool.pids)
        assert stats.rss_bytes == sum(m.worker.rss_bytes for m in stats.members if m.worker)
        assert pool.tokenize("hé") == tuple("hé".encode())
        assert [i.model.path for i in pool.info()] == ["mock-model", "mock-model"]


def test_concurrent_streams_across_members() -> None:
    with mock_pool(members=3) as pool:
        streams = [pool.generate(f"w{i} x", max_tokens=LONG, extra=SLOW) for i in range(3)]
        stats = pool.stats()
        assert [m.outstanding for m in stats.members] == [1, 1, 1]
        assert stats.outstanding == 3 and stats.alive == 3
        assert len({m.worker.pid for m in stats.members if m.worker}) == 3
        texts: list[str] = [""] * 3

        def read(i: int) -> None:
            with streams[i] as stream:
                texts[i] = "".join(next(stream).text for _ in range(20))

        threads = [threading.Thread(target=read, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert texts == [" ".join([f"w{i}", "x"] * 10) for i in range(3)]
        assert pool.stats().outstanding == 0


def test_a_member_crash_mid_stream_fails_only_its_streams() -> None:
    with mock_pool(members=2, restart=RestartPolicy(max_restarts=2)) as pool:
        old = pool.pids
        doomed = pool.generate("a b", max_tokens=LONG, extra={"mock": {"crash_after": 3}})
        fine = pool.generate("c d", max_tokens=30, extra=SLOW)
        with pytest.raises(WorkerCrashed), doomed:
            list(doomed)
        assert fine.text() == " ".join(["c", "d"] * 15)
        eventually(lambda: pool.members[0].restarts == 1)
        assert pool.pids[0] != old[0] and pool.pids[1] == old[1]
        assert pool.stats().outstanding == 0
        # both members serve again, the restarted one with its model reloaded
        streams = [pool.generate("again", max_tokens=2) for _ in range(2)]
        assert [s.text() for s in streams] == ["again again"] * 2
        assert pool.members[0].model is not None


def test_a_member_that_cannot_restart_is_left_out() -> None:
    with mock_pool(members=2) as pool:  # no restart policy
        with pytest.raises(WorkerCrashed):
            list(
                pool.generate(
                    "a", max_tokens=LONG, cache_key="k", extra={"mock": {"crash_after": 1}}
                )
            )
        eventually(lambda: not pool.members[0].alive)
        with pool.generate("b", cache_key="k", max_tokens=2) as s:
            assert s.text() == "b b"
        assert pool.placement.affinity("k") == 1
        stats = pool.stats()
        assert stats.alive == 1 and stats.members[0].worker is None
        assert stats.members[0].error


def test_a_member_crash_mid_load() -> None:
    with mock_pool(members=2, restart=RestartPolicy(max_restarts=2)) as pool:
        victim = pool.members[1]
        outcome: list[BaseException | tuple[object, ...]] = []

        def load() -> None:
            try:
                outcome.append(pool.load("new-model", extra={"mock": {"load_delay": 5.0}}))
            except BaseException as exc:
                outcome.append(exc)

        loader = threading.Thread(target=load)
        loader.start()
        child = victim._sup.child
        assert child is not None
        eventually(lambda: child.core.in_flight >= 1)  # the load is open on member 1
        os.kill(child.pid, signal.SIGKILL)
        loader.join()
        assert len(outcome) == 1 and isinstance(outcome[0], WorkerCrashed)
        assert pool.members[0].model is not None and pool.members[0].model.path == "new-model"
        eventually(lambda: victim.restarts == 1)
        assert victim.model is not None and victim.model.path == "mock-model"
        assert [s.text() for s in (pool.generate("x", max_tokens=1) for _ in range(2))] == ["x"] * 2
        loaded = pool.load("new-model")
        assert [m.model.path for m in loaded] == ["new-model"] * 2


def test_close_with_streams_open_leaves_no_process() -> None:
    pool = mock_pool(members=2)
    pids = pool.pids
    streams = [pool.generate("a b", max_tokens=LONG, extra=SLOW) for _ in range(4)]
    for s in streams:
        assert isinstance(next(s), Token)
    started = time.monotonic()
    pool.close()
    assert time.monotonic() - started < 20
    for s in streams:
        assert s.wait(10)
        try:
            assert s.result.finish_reason == "cancelled"
        except WorkerClosed:
            pass
    assert not psutil.Process().children(recursive=True)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)
    assert pool.closed and pool.stats().alive == 0
    with pytest.raises(WorkerClosed):
        pool.generate("late", max_tokens=1)
    pool.close()  # idempotent


def test_devices_give_each_member_its_device() -> None:
    with mock_pool(devices=[0, "1"], members=3) as pool:
        seen = [psutil.Process(pid).environ().get("CUDA_VISIBLE_DEVICES") for pid in pool.pids]
        assert seen == ["0", "1", "0"]
        assert [m.device for m in pool.stats().members] == ["0", "1", "0"]


def test_members_that_fail_to_start_raise_and_leave_nothing() -> None:
    dead = [sys.executable, "-c", "import sys; sys.stderr.write('no luck'); sys.exit(3)"]
    with pytest.raises(WorkerCrashed, match="no luck"):
        WorkerPool(dead, members=3, env=ENV, cwd=ROOT, **FAST)
    assert not psutil.Process().children(recursive=True)


@pytest.mark.timeout(180)
def test_a_pool_of_real_workers(tiny_model: Path) -> None:
    with WorkerPool(members=2, model=tiny_model, env=ENV, cwd=ROOT, start_timeout=120) as pool:
        messages = [{"role": "user", "content": "hello"}]
        first = pool.chat(messages, cache_key="one", max_tokens=6, temperature=0.0)
        second = pool.chat(messages, cache_key="two", max_tokens=6, temperature=0.0)
        assert (pool.placement.affinity("one"), pool.placement.affinity("two")) == (0, 1)
        with first, second:
            texts = [first.text(), second.text()]
        assert texts[0] == texts[1] and texts[0]
        assert first.result.usage.completion_tokens == 6
        stats = pool.stats()
        assert all(m.worker is not None and m.worker.mlx is not None for m in stats.members)
        assert len({m.worker.pid for m in stats.members if m.worker}) == 2
