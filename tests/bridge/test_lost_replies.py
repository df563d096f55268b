"""No reply is ever lost, and no line ends the process (issue 9, item 5).

A reply that JSON cannot carry (an integer beyond 64 bits, or any failure
inside its encoding) becomes an ``internal`` error line for its id, and that
line is the request's one terminal line. A failure on the stdin thread that
is not a wire error is answered with ``internal`` for that line's id, and the
next line is served. Fakes at the seams (a pipe, an engine); no MLX.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import orjson
import pytest

from bridge.loop.jobs import Job
from bridge.loop.router import Router
from bridge.loop.scheduler import BatchScheduler
from bridge.loop.stdio import LineWriter
from protocol.codec import Unencodable, encode, encode_or_error
from protocol.replies import Done, HelloReply, Pong, Reply, TokenEvent, TokensReply
from protocol.requests import Generate, Tokenize

pytestmark = pytest.mark.timeout(20)

HUGE = 2**70


def done(rid: str | int | None, tokens: int = 1) -> Done:
    return Done(
        id=rid,
        finish_reason="length",
        tokens_generated=tokens,
        prompt_tokens=1,
        prompt_tps=1.0,
        generation_tps=1.0,
        ttft_ms=None,
        queue_ms=0.0,
        peak_memory_bytes=0,
    )


@dataclass
class Pipe:
    writer: LineWriter
    read_fd: int

    def lines(self) -> list[dict[str, object]]:
        os.set_blocking(self.read_fd, False)
        data = b""
        while True:
            try:
                chunk = os.read(self.read_fd, 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                break
            data += chunk
        return [orjson.loads(line) for line in data.splitlines()]


@pytest.fixture
def pipe() -> Iterator[Pipe]:
    r, w = os.pipe()
    yield Pipe(LineWriter(w), r)
    os.close(r)
    os.close(w)


def test_encode_of_a_huge_integer_raises_unencodable_with_the_id() -> None:
    with pytest.raises(Unencodable) as info:
        encode(TokensReply(id="t1", tokens=(1, HUGE)))
    assert info.value.request_id == "t1" and info.value.code == "internal"
    assert "Integer exceeds 64-bit range" in info.value.message


@pytest.mark.parametrize("rid", ["r", 7, None])
def test_encode_or_error_gives_an_internal_error_line_for_the_id(rid: str | int | None) -> None:
    line, encoded = encode_or_error(done(rid, tokens=HUGE))
    assert not encoded
    reply = orjson.loads(line)
    assert reply["type"] == "error" and reply["code"] == "internal"
    assert reply.get("id") == rid
    assert "Done reply could not be encoded" in reply["error"]
    assert encode_or_error(Pong(id=rid)) == (encode(Pong(id=rid)), True)


def test_writer_send_of_an_unencodable_reply_writes_an_error_line(pipe: Pipe) -> None:
    assert pipe.writer.send(TokensReply(id=3, tokens=(HUGE,))) is False
    assert pipe.writer.send(Pong(id=4)) is True
    first, second = pipe.lines()
    assert first["type"] == "error" and first["code"] == "internal" and first["id"] == 3
    assert second == {"type": "pong", "id": 4, "ok": True}


def test_job_finish_with_an_unencodable_reply_still_ends_with_one_line(pipe: Pipe) -> None:
    job = Job(request=Tokenize(id="tk", text="x"), send=pipe.writer.send)
    assert job.finish(TokensReply(id="tk", tokens=(HUGE,)))
    assert not job.finish(TokensReply(id="tk", tokens=(1,)))
    (line,) = pipe.lines()
    assert line["type"] == "error" and line["code"] == "internal" and line["id"] == "tk"


def test_an_unencodable_token_ends_the_request_and_cancels_it(pipe: Pipe) -> None:
    job = Job(request=Generate(id="g", prompt="x"), send=pipe.writer.send)
    job.emit(TokenEvent(id="g", token="a", token_id=1))
    job.emit(TokenEvent(id="g", token="b", token_id=HUGE))
    job.emit(TokenEvent(id="g", token="c", token_id=3))
    assert job.finished and job.cancelled
    assert not job.finish(done("g"))
    lines = pipe.lines()
    assert [line["type"] for line in lines] == ["token", "error"]
    assert lines[1]["code"] == "internal" and lines[1]["id"] == "g"


@pytest.mark.parametrize("with_write", [False, True])
def test_an_unencodable_token_frees_the_id_before_its_error_line(
    pipe: Pipe, with_write: bool
) -> None:
    """As with finish: a host that reuses the id on reading the error line
    must not get duplicate_id."""
    seen: list[str] = []

    def write(line: bytes) -> None:
        seen.append("line")
        pipe.writer.write(line)

    def send(reply: Reply) -> bool:
        seen.append("line")
        return pipe.writer.send(reply)

    job = Job(
        request=Generate(id="g", prompt="x"),
        send=send,
        write=write if with_write else None,
        on_finish=lambda job: seen.append("freed"),
    )
    job.emit(TokenEvent(id="g", token="b", token_id=HUGE))
    assert seen == ["freed", "line"]
    assert pipe.lines()[0]["code"] == "internal"


class BrokenFactsEngine:
    """An engine whose ``facts`` fails the way a bug would (not a WireError)."""

    def facts(self) -> object:
        raise RuntimeError("facts exploded")

    def warm_up(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_failure_on_the_stdin_thread_is_answered_and_the_next_line_served(
    pipe: Pipe,
) -> None:
    engine = BrokenFactsEngine()
    scheduler = BatchScheduler(engine)  # type: ignore[arg-type]

    def hello(rid: str | int | None) -> HelloReply:
        raise ValueError("hello exploded")

    router = Router(
        engine=engine,  # type: ignore[arg-type]
        scheduler=scheduler,
        writer=pipe.writer,
        hello=hello,
        max_line_bytes=1000,
    )
    assert router.dispatch(b'{"cmd":"info","id":"i1"}') is None
    assert router.dispatch(b'{"cmd":"hello","id":2}') is None
    assert router.dispatch(b'{"cmd":"hello"}') is None
    assert router.dispatch(b'{"cmd":"ping","id":"p"}') is None
    lines = pipe.lines()
    assert [(line["type"], line.get("code"), line.get("id")) for line in lines] == [
        ("error", "internal", "i1"),
        ("error", "internal", 2),
        ("error", "internal", None),
        ("pong", None, "p"),
    ]
    assert lines[0]["error"] == "RuntimeError: facts exploded"
