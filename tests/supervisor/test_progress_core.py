"""Progress events through the I/O-free core and the reply sinks, no worker:
in order with a stream's tokens, to ``on_progress`` for a ``load``, only when
asked, and never counted as a terminal line."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest

from protocol.replies import Loaded, ProgressEvent, TokenEvent
from supervisor import commands
from supervisor.async_stream import AsyncReplySink
from supervisor.core import WorkerCore
from supervisor.errors import InvalidArgument, ProtocolError
from supervisor.results import Token
from supervisor.stream import ReplySink
from tests.protocol.test_reply_decode import DONE, FACTS
from tests.supervisor.test_core import Sink, lines

PREFILL = [
    ProgressEvent(id=1, stage="prefill", done=256, total=512),
    ProgressEvent(id=1, stage="prefill", done=512, total=512),
]


def _loaded(rid: int) -> Loaded:
    return Loaded(id=rid, model=FACTS, load_ms=1.0)


def test_a_stream_that_asked_gets_progress_in_order_with_its_tokens() -> None:
    core = WorkerCore()
    sink = Sink()
    rid, line = core.open("generate", commands.generate_fields("x", {}, progress=True), sink)
    assert b'"progress":true' in line and rid == 1
    core.feed(lines(*PREFILL, TokenEvent(id=rid, token="a", token_id=5)))
    core.feed(lines(TokenEvent(id=rid, token="b", token_id=6)))
    assert sink.tokens_seen == [*PREFILL, Token("a", 5), Token("b", 6)]
    assert sink.reply is None and core.is_open(rid)  # progress is not terminal
    core.feed(lines(DONE))
    assert sink.reply == DONE


def test_progress_for_a_request_that_did_not_ask_is_a_fault_of_that_request() -> None:
    core = WorkerCore()
    asked, plain = Sink(), Sink()
    core.open("generate", commands.generate_fields("x", {}, progress=True), asked)
    rid, line = core.open("generate", commands.generate_fields("y", {}), plain)
    assert b"progress" not in line
    event = ProgressEvent(id=rid, stage="prefill", done=1, total=2)
    assert core.feed(lines(event)) == [rid]  # to cancel
    assert isinstance(plain.error, ProtocolError) and "did not ask" in str(plain.error)
    assert asked.error is None and core.is_open(1)


@pytest.mark.parametrize(
    "line",
    [
        b'{"type":"progress","id":1,"stage":"prefill","done":-1}\n',
        b'{"type":"progress","id":1,"stage":5}\n',
        b'{"type":"progress","id":1}\n',
    ],
)
def test_a_malformed_progress_line_fails_only_its_request(line: bytes) -> None:
    core = WorkerCore()
    sink, other = Sink(), Sink()
    core.open("generate", commands.generate_fields("x", {}, progress=True), sink)
    core.open("ping", None, other)
    core.feed(line)
    assert isinstance(sink.error, ProtocolError)
    assert other.error is None


def test_late_progress_of_an_abandoned_request_is_dropped_until_its_end() -> None:
    core = WorkerCore()
    sink = Sink()
    rid, _ = core.open("generate", commands.generate_fields("x", {}, progress=True), sink)
    assert core.abandon(rid)
    assert core.feed(lines(*PREFILL)) == []  # not an unknown id, not an end
    assert core.feed(lines(DONE)) == []
    assert core.feed(lines(*PREFILL)) == [] or core.protocol_faults == 1


def test_an_overlong_progress_line_is_not_taken_for_the_end() -> None:
    core = WorkerCore(max_line_bytes=60)
    sink = Sink()
    rid, _ = core.open("generate", commands.generate_fields("x", {}, progress=True), sink)
    long = ProgressEvent(id=rid, stage="prefill" + "x" * 100)
    assert core.feed(lines(long)) == [rid]  # not ended: the worker is asked to cancel
    assert isinstance(sink.error, ProtocolError)


def test_a_load_that_asked_hands_progress_to_its_sink() -> None:
    core = WorkerCore()
    sink = Sink()
    rid, _ = core.open("load", commands.load_fields("/m", progress=True), sink)
    steps = [
        ProgressEvent(id=rid, stage="load", step="checking", done=3, total=3, unit="files"),
        ProgressEvent(id=rid, stage="load", step="ready"),
    ]
    core.feed(lines(*steps, _loaded(rid)))
    assert sink.progress_seen == steps and sink.tokens_seen == []
    assert isinstance(sink.reply, Loaded)


def test_reply_sink_calls_on_progress_on_the_waiting_thread() -> None:
    core = WorkerCore()
    seen: list[tuple[ProgressEvent, str]] = []
    sink = ReplySink(lambda e: seen.append((e, threading.current_thread().name)))
    rid, _ = core.open("load", commands.load_fields("/m", progress=True), sink)
    events = [ProgressEvent(id=rid, stage="load", step=s) for s in ("checking", "tokenizer")]

    def feeder() -> None:
        for event in events:
            core.feed(lines(event))
        core.feed(lines(_loaded(rid)))

    thread = threading.Thread(target=feeder, name="reader")
    thread.start()
    assert sink.wait(5.0)
    thread.join()
    assert [e for e, _ in seen] == events
    assert {name for _, name in seen} == {threading.current_thread().name}
    assert isinstance(sink.value(), Loaded)
    assert sink.wait(0.0)  # still ended for a second wait


def test_reply_sink_without_a_reply_times_out_after_its_progress() -> None:
    seen: list[ProgressEvent] = []
    sink = ReplySink(seen.append)
    sink.progress(ProgressEvent(id=1, stage="load", step="weights", done=0, total=9))
    assert not sink.wait(0.05)
    assert len(seen) == 1


def test_async_reply_sink_calls_on_progress_in_the_awaiting_task() -> None:
    async def main() -> list[ProgressEvent]:
        core = WorkerCore()
        seen: list[ProgressEvent] = []
        sink = AsyncReplySink(seen.append)
        rid, _ = core.open("load", commands.load_fields("/m", progress=True), sink)
        event = ProgressEvent(id=rid, stage="load", step="ready")
        loop = asyncio.get_running_loop()
        loop.call_soon(core.feed, lines(event))
        loop.call_later(0.01, core.feed, lines(_loaded(rid)))
        assert await sink.wait(5.0)
        assert isinstance(sink.value(), Loaded)
        return seen

    assert [e.step for e in asyncio.run(main())] == ["ready"]


@pytest.mark.parametrize("value", [1, "yes", None, [], {"a": 1}], ids=repr)
def test_a_progress_argument_that_is_not_a_bool_is_refused(value: object) -> None:
    if value is None:  # None is JSON null: the parser's default
        commands.generate_fields("x", {}, progress=value)  # type: ignore[arg-type]
        return
    builds: list[Callable[[], object]] = [
        lambda: commands.generate_fields("x", {}, progress=value),  # type: ignore[arg-type]
        lambda: commands.chat_fields([{"role": "user", "content": "x"}], {}, progress=value),  # type: ignore[arg-type]
        lambda: commands.load_fields("/m", progress=value),  # type: ignore[arg-type]
    ]
    for build in builds:
        with pytest.raises(InvalidArgument, match=r"\w+: progress: must be true or false"):
            build()


def test_reloads_after_a_restart_do_not_ask_for_progress() -> None:
    fields = commands.load_fields("/m", progress=True)
    assert fields["progress"] is True
    assert "progress" not in commands.without_progress(fields)
