"""End to end against the real worker, ``python -m bridge``, with the tiny offline model."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from supervisor import AsyncWorker, Worker
from tests.supervisor.conftest import ENV, ROOT

pytestmark = pytest.mark.timeout(60)


def test_chat_cancel_and_close(tiny_model: Path) -> None:
    with Worker(model=tiny_model, env=ENV, cwd=ROOT) as w:
        assert w.model is not None and w.model.model_type == "qwen3"
        messages = [{"role": "user", "content": "hello"}]
        with w.chat(messages, max_tokens=8) as stream:
            tokens = list(stream)
        assert len(tokens) == 8 and "".join(t.text for t in tokens)
        result = stream.result
        assert result.finish_reason == "length" and result.usage.completion_tokens == 8
        assert result.usage.prompt_tokens > 0 and result.timings.ttft_ms is not None

        with w.generate("def main():", max_tokens=100_000) as long:
            next(long)
            started = time.perf_counter()
            long.cancel()
            assert time.perf_counter() - started < 1.0
        assert long.result.finish_reason == "cancelled"
        assert w.stats().mlx is not None
        started = time.perf_counter()
    assert time.perf_counter() - started < 2.0
    assert w.returncode == 0


def test_async_chat_against_the_real_worker(tiny_model: Path) -> None:
    import asyncio

    async def main() -> str:
        async with AsyncWorker(model=tiny_model, env=ENV, cwd=ROOT) as w:
            return await w.chat([{"role": "user", "content": "hi"}], max_tokens=5).text()

    assert asyncio.run(main())


def test_model_root_confines_load(tiny_model: Path, tmp_path: Path) -> None:
    """``model_root`` reaches the worker as ``--model-root``: a model outside it is forbidden."""
    from supervisor import RequestError

    with Worker(env=ENV, cwd=ROOT, model_root=tmp_path) as w:
        with pytest.raises(RequestError) as caught:
            w.load(tiny_model)
        assert caught.value.code == "forbidden"
        assert w.ping() >= 0  # refused, and still serving
    with Worker(env=ENV, cwd=ROOT, model_root=tiny_model.parent, model=tiny_model) as w:
        assert w.model is not None
