"""The supervisor over a sharded worker (``--ranks 2``): a dead rank is ``WorkerCrashed`` with its rank."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from supervisor import AsyncWorker, Worker, WorkerCrashed
from tests.harness import alive_after
from tests.supervisor.conftest import ENV, ROOT

pytestmark = pytest.mark.timeout(120)

SHARDED = (sys.executable, "-P", "-m", "bridge", "--ranks", "2", "--backend", "ring")


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
        assert alive_after([rank1], 5) == []


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
    assert alive_after(pids, 5) == []
