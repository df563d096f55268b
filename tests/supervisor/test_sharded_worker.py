"""The supervisor over a sharded worker (``--ranks 2``): a dead rank is ``WorkerCrashed`` with its rank."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from supervisor import AsyncWorker, Worker, WorkerCrashed
from tests.supervisor.conftest import ENV, ROOT

pytestmark = pytest.mark.timeout(120)

SHARDED = (sys.executable, "-P", "-m", "bridge", "--ranks", "2", "--backend", "ring")


def other_ranks(info_ranks: list[int], own: int) -> list[int]:
    return [pid for pid in info_ranks if pid != own]


def alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def test_a_dead_rank_fails_the_stream_with_its_rank(tiny_model: Path) -> None:
    with Worker(SHARDED, model=tiny_model, env=ENV, cwd=ROOT, start_timeout=120) as worker:
        sharding = worker.info().model.sharding
        assert sharding is not None and len(sharding.ranks) == 2
        rank1 = sharding.ranks[1].pid
        stream = worker.generate("x", max_tokens=100_000)
        with stream:
            next(iter(stream))
            killed = time.monotonic()
            os.kill(rank1, signal.SIGKILL)
            with pytest.raises(WorkerCrashed) as caught:
                for _ in stream:
                    pass
        assert time.monotonic() - killed < 10
        error = caught.value
        assert error.rank == 1 and error.exit_code == -9 and error.signal == 9
        assert "rank 1" in str(error) and "SIGKILL" in str(error)
        deadline = time.monotonic() + 5
        while alive([rank1]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert alive([rank1]) == []


def test_the_async_twin_and_close_end_every_rank(tiny_model: Path) -> None:
    async def main() -> list[int]:
        async with AsyncWorker(
            SHARDED, model=tiny_model, env=ENV, cwd=ROOT, start_timeout=120
        ) as worker:
            info = await worker.info()
            assert info.model.sharding is not None
            pids = [r.pid for r in info.model.sharding.ranks]
            stream = worker.generate("hello world", max_tokens=8, temperature=0.0)
            async with stream:
                text = await stream.text()
            assert text
        return pids

    pids = asyncio.run(main())
    deadline = time.monotonic() + 5
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert alive(pids) == []
