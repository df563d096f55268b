"""``AsyncWorker`` against ``python -m mock_worker``: the twin behaves like ``Worker``.

Each test runs its own event loop with ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from supervisor import (
    AsyncWorker,
    MemoryLimitExceeded,
    ProtocolError,
    RequestError,
    RestartPolicy,
    WorkerClosed,
    WorkerCrashed,
    WorkerTimeout,
)
from tests.supervisor.conftest import async_mock_worker

pytestmark = pytest.mark.timeout(30)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 25))


def test_session_and_every_command(tmp_path: Path) -> None:
    async def main() -> None:
        async with async_mock_worker() as w:
            assert w.hello.protocol_version == 1
            async with w.chat([{"role": "user", "content": "hi there"}], max_tokens=3) as stream:
                text = "".join([t.text async for t in stream])
            assert text == "hi there hi"
            assert stream.result.finish_reason == "length"
            assert stream.result.usage.completion_tokens == 3
            assert await w.ping() < 1.0
            assert (await w.info()).model.path == "mock-model"
            assert await w.tokenize("ab") == (97, 98)
            assert await w.detokenize([97, 98]) == "ab"
            attention = await w.inspect("ab", directory=tmp_path)
            assert attention.seq_len == 2 and attention.dir == str(tmp_path)
            assert (await w.stats()).rss_bytes > 0
            assert await w.unload() is True
            loaded = await w.load("other")
            assert w.model == loaded.model
        assert w.closed and w.returncode == 0
        with pytest.raises(WorkerClosed):
            await w.ping()

    run(main)
    assert (tmp_path / "queries_00.bin").stat().st_size == 4 * 4 * 2 * 16


def test_eight_tasks_stream_concurrently_over_one_worker() -> None:
    async def main() -> None:
        async with async_mock_worker() as w:

            async def one(k: int) -> list[str]:
                async with w.generate(f"t{k}a t{k}b", max_tokens=300) as stream:
                    words = [t.text.strip() async for t in stream]
                assert stream.result.usage.completion_tokens == 300
                return words

            results = await asyncio.gather(*(one(k) for k in range(8)))
        for k, words in enumerate(results):
            assert words == [f"t{k}a", f"t{k}b"] * 150

    run(main)


def test_break_cancels_and_cancel_waits_for_the_end() -> None:
    async def main() -> None:
        async with async_mock_worker("--token-delay", "0.01") as w:
            async with w.generate("a b", max_tokens=10_000) as stream:
                async for _ in stream:
                    break
            assert stream.result.finish_reason == "cancelled"
            second = w.generate("c", max_tokens=10_000)
            await second.__anext__()
            await second.cancel()
            assert second.ended and second.result.finish_reason == "cancelled"

    run(main)


def test_request_error_and_timeout() -> None:
    async def main() -> None:
        async with async_mock_worker(model=None) as w:
            with pytest.raises(RequestError, match="no_model"):
                await w.generate("x").text()
            await w.load("m")
            slow = {"mock": {"token_delay": 1.0}}
            started = time.perf_counter()
            with pytest.raises(WorkerTimeout, match="cancelled"):
                await w.generate("x", timeout=0.2, extra=slow).text()
            assert time.perf_counter() - started < 1.0
            assert await w.generate("y", max_tokens=2).text() == "y y"

    run(main)


def test_crash_is_noticed_at_once_and_restart_brings_the_model_back() -> None:
    async def main() -> None:
        policy = RestartPolicy(max_restarts=1, window_s=60)
        async with async_mock_worker("--token-delay", "0.01", restart=policy) as w:
            old = w.pid
            stream = w.generate("a", max_tokens=100_000)
            await stream.__anext__()
            os.kill(old, signal.SIGKILL)
            killed = time.perf_counter()
            with pytest.raises(WorkerCrashed) as caught:
                async for _ in stream:
                    pass
            assert time.perf_counter() - killed < 0.1
            assert caught.value.signal == signal.SIGKILL
            await w.ping()
            assert w.pid != old and w.restarts == 1
            assert await w.generate("back", max_tokens=1).text() == "back"
            crash = {"mock": {"crash_after": 0}}
            with pytest.raises(WorkerCrashed):
                await w.generate("x", extra=crash).text()
            with pytest.raises(WorkerCrashed, match="gave up restarting"):
                await w.ping()

    run(main)


def test_garbage_and_ignored_cancel() -> None:
    async def main() -> None:
        async with async_mock_worker(cancel_grace=0.3) as w:
            with pytest.raises(ProtocolError):
                await w.generate("a", max_tokens=50, extra={"mock": {"garbage_after": 1}}).text()
            assert await w.ping() < 1.0
            hung = {"mock": {"ignore_cancel": True, "token_delay": 0.01}}
            stream = w.generate("a", max_tokens=10_000, extra=hung)
            await stream.__anext__()
            with pytest.raises(WorkerTimeout, match="taken for hung"):
                await stream.cancel()
            with pytest.raises(WorkerCrashed, match="killed by the supervisor"):
                await w.ping()

    run(main)


@pytest.mark.parametrize("pause", [0.0, 0.3], ids=["kill-in-stream", "kill-before-generate"])
def test_memory_limit(pause: float) -> None:
    """See test_faults: wherever the kill falls, MemoryLimitExceeded from then on."""

    async def main() -> None:
        async with async_mock_worker(
            "--token-delay", "0.01", model=None, memory_limit_bytes=1, memory_poll_interval=0.05
        ) as w:
            with pytest.raises(MemoryLimitExceeded) as caught:
                await w.load("mock-model")
                await asyncio.sleep(pause)
                await w.generate("a", max_tokens=10_000).text()
            assert caught.value.limit_bytes == 1 and caught.value.rss_bytes > 1
            for _ in range(2):
                with pytest.raises(MemoryLimitExceeded, match="over the limit .* killed it"):
                    await w.ping()
            assert w.returncode == -signal.SIGKILL

    run(main)


def test_slow_hello_and_early_exit() -> None:
    async def main() -> None:
        with pytest.raises(WorkerTimeout, match="hello"):
            await async_mock_worker("--hello-delay", "5", start_timeout=0.3).start()
        with pytest.raises(WorkerCrashed) as caught:
            await async_mock_worker("--no-such-flag").start()
        assert caught.value.exit_code == 2 and "--no-such-flag" in caught.value.stderr_tail

    run(main)


def test_close_ladder_rungs() -> None:
    async def main() -> None:
        w = await async_mock_worker("--ignore-quit", quit_timeout=0.2).start()
        await w.aclose()
        assert w.returncode == -signal.SIGTERM
        w = await async_mock_worker(
            "--ignore-quit", "--ignore-sigterm", quit_timeout=0.2, term_timeout=0.2
        ).start()
        await w.aclose()
        assert w.returncode == -signal.SIGKILL
        await w.aclose()  # idempotent

    run(main)


def test_a_cancelled_close_kills_the_worker() -> None:
    async def main() -> None:
        w = await async_mock_worker("--ignore-quit", quit_timeout=5.0).start()
        closing = asyncio.create_task(w.aclose())
        await asyncio.sleep(0.2)
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        child = w._sup.child
        assert child is not None
        assert await asyncio.wait_for(child.proc.wait(), 2) == -signal.SIGKILL

    run(main)


def test_a_task_cancelled_while_streaming_cancels_the_request() -> None:
    async def main() -> None:
        async with async_mock_worker("--token-delay", "0.01") as w:
            seen = asyncio.Event()

            async def consume() -> None:
                async with w.generate("a", max_tokens=100_000) as stream:
                    async for _ in stream:
                        seen.set()

            task = asyncio.create_task(consume())
            await seen.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await w.generate("next", max_tokens=1).text() == "next"  # not stuck behind it

    run(main)


def test_not_started_worker() -> None:
    w = AsyncWorker()
    with pytest.raises(RuntimeError, match="not started"):
        _ = w.pid
    asyncio.run(w.aclose())  # closing a worker that never started is fine
