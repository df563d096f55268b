"""``AsyncWorkerPool`` over real children: the twin behaves like ``WorkerPool``.

Each test runs its own event loop with ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from supervisor import AsyncWorkerPool, RestartPolicy, WorkerClosed, WorkerCrashed
from tests.supervisor.conftest import ENV, FAST, MOCK, ROOT

pytestmark = pytest.mark.timeout(60)

SLOW = {"mock": {"token_delay": 0.05}}
LONG = 100_000


def run(test: Callable[[], Awaitable[None]], within: float = 50) -> None:
    asyncio.run(asyncio.wait_for(test(), within))


def async_mock_pool(
    *flags: str, model: str | None = "mock-model", **options: Any
) -> AsyncWorkerPool:
    env = ENV | options.pop("env", {})
    return AsyncWorkerPool(
        [*MOCK, *flags], model=model, **(FAST | {"env": env, "cwd": ROOT} | options)
    )


async def eventually(check: Callable[[], bool], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def test_affinity_and_the_idle_member() -> None:
    async def main() -> None:
        async with async_mock_pool(members=2) as pool:
            a = pool.generate("conv a", cache_key="a", max_tokens=LONG, extra=SLOW)
            b = pool.generate("conv b", cache_key="b", max_tokens=LONG, extra=SLOW)
            async with a, b:
                assert (await a.__anext__()).text == "conv"
                assert (await b.__anext__()).text == "conv"
                await b.aclose()
                again = pool.generate("more a", cache_key="a", max_tokens=LONG, extra=SLOW)
                async with again:
                    assert (await pool.stats()).members[0].outstanding == 2
                    assert (await again.__anext__()).text == "more"
                assert again.result.finish_reason == "cancelled"
                third = pool.chat([{"role": "user", "content": "c"}], cache_key="c", max_tokens=2)
                assert pool.placement.affinity("c") == 1
                assert await third.text() == "c c"
            assert a.result.finish_reason == b.result.finish_reason == "cancelled"
            stats = await pool.stats()
            assert stats.outstanding == 0 and stats.alive == 2
            assert [m.worker.pid for m in stats.members if m.worker] == list(pool.pids)
            assert await pool.tokenize("ab") == (97, 98)
            assert len(await pool.info()) == 2

    run(main)


def test_concurrent_streams_and_a_crash_that_fails_only_its_member() -> None:
    async def main() -> None:
        async with async_mock_pool(members=2, restart=RestartPolicy(max_restarts=2)) as pool:
            old = pool.pids
            doomed = pool.generate("a b", max_tokens=LONG, extra={"mock": {"crash_after": 3}})
            fine = pool.generate("c d", max_tokens=30, extra=SLOW)

            async def crash() -> None:
                with pytest.raises(WorkerCrashed):
                    async with doomed:
                        async for _ in doomed:
                            pass

            _, text = await asyncio.gather(crash(), fine.text())
            assert text == " ".join(["c", "d"] * 15)
            await eventually(lambda: pool.members[0].restarts == 1)
            assert pool.pids[0] != old[0] and pool.pids[1] == old[1]
            texts = await asyncio.gather(
                *(pool.generate("x y", max_tokens=2).text() for _ in range(2))
            )
            assert texts == ["x y", "x y"]
            assert (await pool.stats()).outstanding == 0

    run(main)


def test_a_member_crash_mid_load() -> None:
    async def main() -> None:
        async with async_mock_pool(members=2, restart=RestartPolicy(max_restarts=2)) as pool:
            victim = pool.members[1]
            child = victim._sup.child
            assert child is not None
            load = asyncio.ensure_future(
                pool.load("new-model", extra={"mock": {"load_delay": 5.0}})
            )
            await eventually(lambda: child.core.in_flight >= 1)
            os.kill(child.pid, signal.SIGKILL)
            with pytest.raises(WorkerCrashed):
                await load
            assert pool.members[0].model is not None
            assert pool.members[0].model.path == "new-model"
            await eventually(lambda: victim.restarts == 1)
            assert victim.model is not None and victim.model.path == "mock-model"
            loaded = await pool.load("new-model")
            assert [m.model.path for m in loaded] == ["new-model"] * 2

    run(main)


def test_a_stream_never_sent_gives_its_place_back() -> None:
    async def main() -> None:
        async with async_mock_pool(members=2) as pool:
            dropped = pool.generate("x", max_tokens=1)
            assert pool.placement.outstanding(0) == 1
            del dropped
            gc.collect()
            assert pool.placement.outstanding(0) == 0
            closed = pool.generate("x", max_tokens=1)
            await closed.aclose()
            assert pool.placement.outstanding(0) == 0
            done = pool.generate("x", max_tokens=1)
            assert await done.text() == "x"
            ended: list[int] = []
            done.on_end(lambda: ended.append(1))  # after the end: at once
            assert ended == [1] and (await pool.stats()).outstanding == 0

    run(main)


def test_aclose_with_streams_open_leaves_no_process() -> None:
    async def main() -> None:
        pool = await async_mock_pool(members=2).start()
        pids = pool.pids
        streams = [pool.generate("a b", max_tokens=LONG, extra=SLOW) for _ in range(4)]
        for s in streams:
            await s.__anext__()
        never_sent = pool.generate("x", max_tokens=1)
        await pool.aclose()
        for s in streams:
            assert await s.wait(10)
            try:
                assert s.result.finish_reason == "cancelled"
            except WorkerClosed:
                pass
        await never_sent.aclose()
        assert not psutil.Process().children(recursive=True)
        assert not any(
            psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids
        )
        stats = await pool.stats()
        assert stats.alive == 0 and stats.outstanding == 0
        await pool.aclose()

    run(main)


def test_members_that_fail_to_start_raise_and_leave_nothing() -> None:
    dead = [sys.executable, "-c", "import sys; sys.stderr.write('no luck'); sys.exit(3)"]

    async def main() -> None:
        pool = AsyncWorkerPool(dead, members=3, env=ENV, cwd=ROOT, **FAST)
        with pytest.raises(WorkerCrashed, match="no luck"):
            await pool.start()
        assert not psutil.Process().children(recursive=True)
        assert pool.closed

    run(main)


@pytest.mark.timeout(180)
def test_an_async_pool_of_real_workers(tiny_model: Path) -> None:
    async def main() -> None:
        pool = AsyncWorkerPool(members=2, model=tiny_model, env=ENV, cwd=ROOT, start_timeout=120)
        async with pool:
            messages = [{"role": "user", "content": "hello"}]
            texts = await asyncio.gather(
                *(
                    pool.chat(messages, cache_key=k, max_tokens=5, temperature=0.0).text()
                    for k in ("p", "q")
                )
            )
            assert texts[0] == texts[1] and texts[0]
            assert (pool.placement.affinity("p"), pool.placement.affinity("q")) == (0, 1)

    run(main, 170)
