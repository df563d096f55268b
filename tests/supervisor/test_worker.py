"""The sync ``Worker`` against ``python -m mock_worker``: commands, streams, cancel, threads."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from mock_worker.echo import token_id
from protocol.errors import NoModel
from supervisor import RequestError, Token, WorkerClosed
from tests.supervisor.conftest import mock_worker

pytestmark = pytest.mark.timeout(30)


def test_session_from_the_issue() -> None:
    with mock_worker(model="path/to/model") as w:
        assert w.model is not None and w.model.path == "path/to/model"
        with w.chat([{"role": "user", "content": "hi there"}], max_tokens=5) as stream:
            text = "".join(token.text for token in stream)
        assert text == "hi there hi there hi"
        result = stream.result
        assert result.finish_reason == "length"
        assert result.usage.completion_tokens == 5
        assert result.usage.prompt_tokens > 0
        assert result.timings.ttft_ms is not None and result.timings.generation_tps > 0


def test_every_command(tmp_path: Path) -> None:
    with mock_worker(model=None) as w:
        assert w.hello.protocol_version == 1 and w.hello.pid == w.pid
        assert "generate" in w.hello.commands
        assert w.ping() < 1.0
        loaded = w.load("m", context_len=128)
        assert loaded.model.context_len == 128 and w.model == loaded.model
        info = w.info()
        assert info.model.path == "m" and info.memory.rss_bytes > 0
        assert w.tokenize("hé") == tuple("hé".encode())
        assert w.detokenize(list("hé".encode())) == "hé"
        attention = w.inspect("abc", directory=tmp_path / "attn")
        assert (attention.num_layers, attention.seq_len) == (2, 3)
        assert Path(attention.dir) == tmp_path / "attn"
        assert (tmp_path / "attn" / "keys_01.bin").stat().st_size == 4 * 2 * 3 * 16
        stats = w.stats()
        assert stats.pid == w.pid and stats.rss_bytes > 0 and stats.mlx is not None
        assert w.unload() is True
        assert w.model is None
        assert w.stats().mlx is None


def test_tokens_carry_ids_and_logprobs() -> None:
    with mock_worker() as w:
        tokens = list(w.generate("a b", max_tokens=3, logprobs=2))
    assert [t.text for t in tokens] == ["a", " b", " a"]
    assert tokens[0].token_id == tokens[2].token_id != tokens[1].token_id
    top = tokens[0].top_logprobs
    assert tokens[0].logprob == 0.0 and top is not None and [t.token for t in top] == ["a", "b"]


def test_stop_strings_and_text() -> None:
    with mock_worker() as w:
        stream = w.generate("one two three", max_tokens=50, stop=["three"])
        assert stream.text() == "one two "
        assert stream.result.finish_reason == "stop_sequence"


def test_worker_errors_are_request_errors_with_the_wire_code() -> None:
    with mock_worker(model=None) as w:
        with pytest.raises(RequestError) as caught, w.generate("x") as stream:
            list(stream)
        assert caught.value.code == "no_model"
        assert isinstance(caught.value.error, NoModel)
        assert isinstance(caught.value.__cause__, NoModel)
        with pytest.raises(RequestError, match="invalid_request"):
            w.load("m", context_len=0)
        w.ping()  # still serving


def test_a_request_over_the_workers_line_limit_is_refused_before_sending() -> None:
    with mock_worker("--max-line-bytes", "1000") as w:
        assert w.hello.limits["max_line_bytes"] == 1000
        with pytest.raises(RequestError) as caught:
            w.generate("x" * 2000)
        assert caught.value.code == "line_too_long"
        assert list(w.generate("fine", max_tokens=1)) == [Token("fine", token_id("fine"))]


def test_leaving_the_block_early_cancels_the_stream() -> None:
    with mock_worker("--token-delay", "0.01") as w:
        with w.generate("a b c", max_tokens=10_000) as stream:
            for i, _ in enumerate(stream):
                if i == 2:
                    break
        assert stream.result.finish_reason == "cancelled"
        assert stream.result.usage.completion_tokens < 100


def test_an_exception_in_the_block_cancels_and_propagates() -> None:
    with mock_worker("--token-delay", "0.01") as w:
        with pytest.raises(KeyError), w.generate("a", max_tokens=10_000) as stream:
            next(stream)
            raise KeyError("boom")
        assert stream.result.finish_reason == "cancelled"


def test_cancel_waits_for_the_terminal_line() -> None:
    with mock_worker("--token-delay", "0.005") as w:
        stream = w.generate("a", max_tokens=10_000)
        next(stream)
        started = time.perf_counter()
        stream.cancel()
        assert time.perf_counter() - started < 0.5
        assert stream.ended and stream.result.finish_reason == "cancelled"
        rest = list(stream)  # tokens that were already on their way, then the end
        assert len(rest) < 100
        stream.cancel()  # a no-op once ended


def test_cancel_of_a_queued_stream() -> None:
    with mock_worker("--token-delay", "0.01") as w:
        running = w.generate("a", max_tokens=10_000)
        queued = w.generate("b", max_tokens=10)
        queued.cancel()
        assert queued.result.finish_reason == "cancelled" and list(queued) == []
        running.cancel()


def test_eight_threads_stream_concurrently_over_one_worker() -> None:
    results: dict[int, list[str]] = {}
    errors: list[BaseException] = []
    with mock_worker() as w:

        def run(k: int) -> None:
            try:
                with w.generate(f"w{k}a w{k}b", max_tokens=300) as stream:
                    results[k] = [t.text.strip() for t in stream]
                assert stream.result.usage.completion_tokens == 300
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
    assert not errors, errors
    for k in range(8):
        assert results[k] == [f"w{k}a", f"w{k}b"] * 150  # only its own id's lines


def test_a_closed_worker_refuses_requests() -> None:
    w = mock_worker()
    w.close()
    assert w.closed and w.returncode == 0
    with pytest.raises(WorkerClosed):
        w.ping()
    with pytest.raises(WorkerClosed):
        w.generate("x")
    w.close()  # idempotent


def test_close_ends_running_streams() -> None:
    w = mock_worker("--token-delay", "0.01")
    stream = w.generate("a", max_tokens=10_000)
    next(stream)
    w.close()
    list(stream)
    assert stream.result.finish_reason == "cancelled"


def test_secrets_in_env_stay_out_of_argv() -> None:
    import psutil

    with mock_worker(env={"MY_TOKEN": "s3cret"}) as w:
        proc = psutil.Process(w.pid)
        assert "s3cret" not in " ".join(proc.cmdline())
        assert proc.environ()["MY_TOKEN"] == "s3cret"


def test_tools_and_cache_key_reach_the_worker() -> None:
    with mock_worker() as w:
        tool = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
        messages = [{"role": "user", "content": "a b"}]
        stream = w.chat(messages, tools=[tool], cache_key="session-1", max_tokens=2)
        assert stream.text() == "a b"
        assert stream.result.usage.cached_tokens == 0 and stream.result.tool_calls is None
        with pytest.raises(RequestError, match=r"tools\[0\]\.function: required"):
            w.chat(messages, tools=[{"type": "function"}]).text()
        with pytest.raises(RequestError, match="cache_key: must not be empty"):
            w.generate("x", cache_key="").text()
