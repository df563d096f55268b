"""The I/O-free pieces: line framing, routing in WorkerCore, the storm guard.

Reply decoding is tested in tests/protocol/test_reply_decode.py.
"""

from __future__ import annotations

import pytest

from protocol.codec import encode
from protocol.errors import RequestId
from protocol.replies import (
    Done,
    ErrorReply,
    Pong,
    ProgressEvent,
    Reply,
    TextReply,
    TokenEvent,
)
from supervisor.core import WorkerCore
from supervisor.errors import ProtocolError, RequestError, SupervisorError, WorkerCrashed
from supervisor.framing import LineSplitter, OverlongLine
from supervisor.lifecycle import restart_refusal
from supervisor.restart import RestartGuard, RestartPolicy
from supervisor.results import StreamItem, Token
from tests.protocol.test_reply_decode import DONE

# -- framing -------------------------------------------------------------------------------


def test_splitter_joins_lines_split_anywhere() -> None:
    data = b'{"a":1}\n{"b":2}\n\n{"c":3}\n'
    for step in (1, 2, 3, 7, len(data)):
        splitter = LineSplitter(100)
        lines: list[bytes | OverlongLine] = []
        for i in range(0, len(data), step):
            lines += splitter.feed(data[i : i + step])
        assert [x for x in lines if x] == [b'{"a":1}', b'{"b":2}', b'{"c":3}']
        assert splitter.end() is None


def test_splitter_drops_overlong_lines_without_holding_them() -> None:
    splitter = LineSplitter(10)
    out = splitter.feed(b"ok\n" + b"x" * 25)
    assert out == [b"ok"]
    assert splitter.feed(b"y" * 1000) == []
    out = splitter.feed(b"zz\nfine\n")
    assert out == [OverlongLine(1027, b"x" * 25), b"fine"]
    assert splitter.feed(b"0123456789abc\nlast") == [OverlongLine(13, b"0123456789abc")]
    assert splitter.end() == b"last"


# -- routing -------------------------------------------------------------------------------


class Sink:
    def __init__(self) -> None:
        self.tokens_seen: list[StreamItem] = []
        self.progress_seen: list[ProgressEvent] = []
        self.reply: Reply | None = None
        self.error: SupervisorError | None = None

    def tokens(self, batch: list[StreamItem]) -> None:
        assert self.reply is None and self.error is None
        self.tokens_seen += batch

    def progress(self, event: ProgressEvent) -> None:
        assert self.reply is None and self.error is None
        self.progress_seen.append(event)

    def finish(self, reply: Reply) -> None:
        assert self.reply is None and self.error is None
        self.reply = reply

    def fail(self, error: SupervisorError) -> None:
        assert self.reply is None and self.error is None
        self.error = error


def lines(*replies: Reply) -> bytes:
    return b"".join(encode(r) for r in replies)


def test_core_routes_each_line_to_its_own_request() -> None:
    core = WorkerCore()
    a, b = Sink(), Sink()
    rid_a, line = core.open("generate", {"prompt": "x", "max_tokens": 2}, a)
    assert line == b'{"cmd":"generate","id":1,"prompt":"x","max_tokens":2}\n'
    rid_b, _ = core.open("generate", {"prompt": "y"}, b)
    chunk = lines(
        TokenEvent(id=rid_b, token="y", token_id=2),
        TokenEvent(id=rid_a, token="x", token_id=1, logprob=-1.0),
        TokenEvent(id=rid_a, token="x", token_id=1),
        Done(
            id=rid_a,
            finish_reason="length",
            tokens_generated=2,
            prompt_tokens=3,
            prompt_tps=1.0,
            generation_tps=2.0,
            ttft_ms=1.0,
            peak_memory_bytes=0,
        ),
    )
    for i in range(0, len(chunk), 13):  # arbitrary chunking
        assert core.feed(chunk[i : i + 13]) == []
    assert a.tokens_seen == [Token("x", 1, -1.0), Token("x", 1)]
    assert isinstance(a.reply, Done) and a.reply.id == rid_a
    assert b.tokens_seen == [Token("y", 2)] and b.reply is None
    assert core.in_flight == 1


def test_error_reply_becomes_request_error() -> None:
    core = WorkerCore()
    sink = Sink()
    rid, _ = core.open("info", None, sink)
    core.feed(lines(ErrorReply(id=rid, code="no_model", message="info: no model loaded")))
    assert isinstance(sink.error, RequestError)
    assert sink.error.code == "no_model" and type(sink.error.error).__name__ == "NoModel"


def test_wrong_reply_type_fails_only_that_request() -> None:
    core = WorkerCore()
    ping, other = Sink(), Sink()
    rid, _ = core.open("ping", None, ping)
    core.open("ping", None, other)
    assert core.feed(lines(TextReply(id=rid, text="?"))) == [rid]
    assert isinstance(ping.error, ProtocolError) and other.error is None


def test_garbage_line_fails_every_request_in_flight_and_late_lines_are_dropped() -> None:
    core = WorkerCore()
    a, b = Sink(), Sink()
    rid_a, _ = core.open("generate", {"prompt": "x"}, a)
    rid_b, _ = core.open("generate", {"prompt": "y"}, b)
    chunk = lines(TokenEvent(id=rid_a, token="x", token_id=1)) + b"not json\n"
    assert sorted(core.feed(chunk)) == [rid_a, rid_b]  # to cancel
    assert a.tokens_seen == [Token("x", 1)]  # what came before the fault is kept
    assert isinstance(a.error, ProtocolError) and isinstance(b.error, ProtocolError)
    # their late lines are dropped quietly: no new fault for a third request
    c = Sink()
    core.open("ping", None, c)
    assert core.feed(lines(TokenEvent(id=rid_b, token="y", token_id=2), DONE)) == []
    assert c.error is None and core.protocol_faults == 1


def test_unknown_id_is_a_fault() -> None:
    core = WorkerCore()
    sink = Sink()
    core.open("ping", None, sink)
    core.feed(lines(Pong(id=99)))
    assert isinstance(sink.error, ProtocolError) and "unknown request id 99" in str(sink.error)


def test_overlong_line_fails_only_its_request_when_its_id_is_readable() -> None:
    core = WorkerCore(max_line_bytes=100)
    a, b = Sink(), Sink()
    rid_a, _ = core.open("detokenize", {"tokens": [1]}, a)
    core.open("ping", None, b)
    assert core.feed(lines(TextReply(id=rid_a, text="x" * 500))) == []  # it ended: no cancel
    assert isinstance(a.error, ProtocolError) and "over the limit" in str(a.error)
    assert b.error is None
    core.feed(b'{"type":"text",' + b" " * 200 + b"\n")  # unattributable
    assert isinstance(b.error, ProtocolError)


def test_token_for_a_non_streaming_request_is_a_fault() -> None:
    core = WorkerCore()
    sink = Sink()
    rid, _ = core.open("info", None, sink)
    core.feed(lines(TokenEvent(id=rid, token="x", token_id=1)))
    assert isinstance(sink.error, ProtocolError)


def test_closed_core_refuses_new_requests() -> None:
    core = WorkerCore()
    sink = Sink()
    core.open("ping", None, sink)
    core.fail_all(lambda rid: RequestError("internal", f"gone {rid}", request_id=rid), close=True)
    assert isinstance(sink.error, RequestError)
    with pytest.raises(RequestError, match="gone 2"):
        core.open("ping", None, Sink())


def test_request_over_the_workers_line_limit_is_refused_locally() -> None:
    core = WorkerCore()
    core.worker_max_line_bytes = 50
    with pytest.raises(RequestError) as caught:
        core.open("generate", {"prompt": "x" * 100}, Sink())
    assert caught.value.code == "line_too_long"
    assert core.in_flight == 0


# -- storm guard ---------------------------------------------------------------------------


def test_restart_guard_counts_restarts_in_a_sliding_window() -> None:
    guard = RestartGuard(RestartPolicy(max_restarts=2, window_s=10.0))
    assert guard.allow(0.0) and guard.allow(1.0)
    assert not guard.allow(2.0)
    assert guard.allow(10.5)  # the first one left the window
    assert not guard.allow(10.6)


def test_restart_refusal_without_a_policy_and_after_the_storm_guard_gives_up() -> None:
    def crashed(rid: RequestId | None) -> SupervisorError:
        return WorkerCrashed("worker 7 died", exit_code=3, stderr_tail="boom", request_id=rid)

    assert restart_refusal(None, crashed) is crashed
    guard = RestartGuard(RestartPolicy(max_restarts=1, window_s=60.0))
    assert restart_refusal(guard, crashed) is None  # allowed, and counted
    refusal = restart_refusal(guard, crashed)
    assert refusal is not None
    error = refusal(5)
    assert isinstance(error, WorkerCrashed) and error.request_id == 5
    assert error.message == "gave up restarting: 1 restart(s) within 60 s; last: worker 7 died"
    assert error.exit_code == 3 and error.stderr_tail == "boom"


def test_a_chunk_of_plain_tokens_and_a_malformed_one() -> None:
    core = WorkerCore()
    sink, other = Sink(), Sink()
    rid, _ = core.open("generate", {"prompt": "x"}, sink)
    core.open("generate", {"prompt": "y"}, other)
    plain = lines(*(TokenEvent(id=rid, token=f" w{i}", token_id=i) for i in range(100)))
    assert core.feed(plain) == []  # the fast path
    assert sink.tokens_seen == [Token(f" w{i}", i) for i in range(100)]
    bad = b'{"type":"token","id":%d,"token":5,"token_id":1}\n' % rid
    assert core.feed(plain + bad + plain) == [rid]  # the slow path: the chunk is mixed
    assert len(sink.tokens_seen) == 200  # the tokens before the bad line
    assert isinstance(sink.error, ProtocolError) and "token.token" in str(sink.error)
    assert other.error is None and other.tokens_seen == []
