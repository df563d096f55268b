"""Framing and bad input, on a worker with no model: each bad line gets one error
with the right code (and the field's path first in the message), and the worker
keeps serving."""

from __future__ import annotations

import time
from typing import Final

from ..matching import ABSENT, StartsWith
from ..session import CaseSkipped, Session, fail
from ..table import Case, Group

__all__ = ["GROUP"]

MALFORMED: Final[tuple[tuple[str, bytes, str, str], ...]] = (
    # (what, line, code, message prefix)
    ("not JSON", b"this is not json\n", "invalid_json", ""),
    ("cut-off JSON", b'{"cmd":"ping","id":"cut"\n', "invalid_json", ""),
    ("a list", b'[{"cmd":"ping"}]\n', "invalid_json", ""),
    ("a string", b'"ping"\n', "invalid_json", ""),
    ("a number", b"42\n", "invalid_json", ""),
    ("null", b"null\n", "invalid_json", ""),
    ("invalid UTF-8", b'{"cmd":"ping","id":"utf","x":"\xff\xfe"}\n', "invalid_json", ""),
    ("no cmd", b"{}\n", "invalid_request", "cmd: "),
    ("cmd not a string", b'{"cmd":7}\n', "invalid_request", "cmd: "),
    ("id true", b'{"cmd":"ping","id":true}\n', "invalid_request", "id: "),
    ("id 1.5", b'{"cmd":"ping","id":1.5}\n', "invalid_request", "id: "),
    ("id an object", b'{"cmd":"ping","id":{"a":1}}\n', "invalid_request", "id: "),
    ("id 2^64", b'{"cmd":"ping","id":18446744073709551616}\n', "invalid_request", "id: "),
)
"""Lines answered with an error without id: the line, or its id, could not be read."""

INVALID_FIELDS: Final[tuple[tuple[dict[str, object], str], ...]] = (
    ({"cmd": "generate"}, "prompt: "),
    ({"cmd": "generate", "prompt": 5}, "prompt: "),
    ({"cmd": "generate", "prompt": "x", "max_tokens": -5}, "max_tokens: "),
    ({"cmd": "generate", "prompt": "x", "max_tokens": 0}, "max_tokens: "),
    ({"cmd": "generate", "prompt": "x", "max_tokens": True}, "max_tokens: "),
    ({"cmd": "generate", "prompt": "x", "temperature": "hot"}, "temperature: "),
    ({"cmd": "generate", "prompt": "x", "top_p": 1.5}, "top_p: "),
    ({"cmd": "generate", "prompt": "x", "logprobs": 99}, "logprobs: "),
    ({"cmd": "generate", "prompt": "x", "stop": [1]}, "stop[0]: "),
    ({"cmd": "generate", "prompt": "x", "seed": -1}, "seed: "),
    ({"cmd": "chat", "messages": []}, "messages: "),
    ({"cmd": "chat", "messages": [{"content": "x"}]}, "messages[0].role: "),
    ({"cmd": "chat", "messages": [{"role": "user", "content": 5}]}, "messages[0].content: "),
    (
        {"cmd": "chat", "messages": [{"role": "user", "content": [{"type": "audio"}]}]},
        "messages[0].content[0].type: ",
    ),
    ({"cmd": "load"}, "path: "),
    ({"cmd": "load", "path": "/x", "context_len": 0}, "context_len: "),
    ({"cmd": "tokenize"}, "text: "),
    ({"cmd": "detokenize", "tokens": [1, "a"]}, "tokens[1]: "),
    ({"cmd": "inspect"}, "prompt: "),
    ({"cmd": "inspect", "prompt": "x", "dir": ""}, "dir: "),
)
"""Requests with a missing or wrong field: invalid_request, the field's path first."""


def malformed_lines(s: Session) -> str:
    for what, line, code, prefix in MALFORMED:
        s.send_raw(line)
        reply = s.next_unaddressed(f"the error for a line that is {what}")
        pattern = {"type": "error", "code": code, "id": ABSENT, "error": StartsWith(prefix)}
        s.expect(reply, pattern, f"a line that is {what}")
    return f"{len(MALFORMED)} lines: not JSON, not an object, not UTF-8, no cmd, unreadable id"


def invalid_fields(s: Session) -> str:
    for request, prefix in INVALID_FIELDS:
        rid = s.fresh_id("bad")
        reply = s.call({**request, "id": rid})
        what = f"{request} with id"
        s.expect(reply, {"type": "error", "id": rid, "code": "invalid_request"}, what)
        s.expect(reply, {"error": StartsWith(prefix)}, f"{what}: the message names the field")
        legacy = s.legacy_call(request)
        s.expect(legacy, {"type": "error", "id": ABSENT, "code": "invalid_request"}, "legacy")
        s.expect(legacy, {"error": StartsWith(prefix)}, f"{request}: the message names the field")
    return f"{len(INVALID_FIELDS)} bad fields, each named, in both dialects"


def unknown_command(s: Session) -> None:
    reply = s.call({"cmd": "frobnicate", "id": 7})
    pattern = {"type": "error", "id": 7, "code": "unknown_command", "error": StartsWith("cmd: ")}
    s.expect(reply, pattern, "unknown command with id 7")
    legacy = s.legacy_call({"cmd": "frobnicate"})
    s.expect(legacy, {**pattern, "id": ABSENT}, "legacy unknown command")


def framing(s: Session) -> str:
    s.send_raw(b'{"cmd":"ping","id":"crlf"}\r\n', note='{"cmd":"ping","id":"crlf"}\\r\\n')
    crlf = s.track({"cmd": "ping", "id": "crlf"})
    s.wait(crlf)
    s.send_raw(b"\n   \n\t\r\n", note="three blank lines")
    batch = [{"cmd": "ping", "id": f"batch-{i}"} for i in range(3)]
    s.send_raw(
        b"".join(b'{"cmd":"ping","id":"batch-%d"}\n' % i for i in range(3)),
        note="three pings in one write",
    )
    exchanges = [s.track(request) for request in batch]
    s.wait(*exchanges)
    order = [e.terminal_seq for e in exchanges if e is not None]
    if order != sorted(order):
        raise fail("three pings in one write were answered out of order")
    return r"\r\n accepted; blank lines ignored; several lines in one write"


def unknown_and_null_fields(s: Session) -> str:
    reply = s.call({"cmd": "ping", "id": "future", "future_field": {"nested": [1, 2]}})
    s.expect(reply, {"type": "pong", "id": "future"}, "a ping with an unknown field")
    if s.hello is not None and s.hello["model"] is not None:
        raise CaseSkipped("the worker started with a model; the null-field check needs none")
    nulls = {
        "cmd": "generate",
        "id": "nulls",
        "prompt": "x",
        "max_tokens": None,
        "temperature": None,
        "top_p": None,
        "top_k": None,
        "stop": None,
        "seed": None,
        "logprobs": None,
        "logit_bias": None,
    }
    reply = s.call(nulls)
    s.expect(reply, {"type": "error", "id": "nulls", "code": "no_model"}, "null optional fields")
    return "unknown fields ignored; null = absent (the nulls passed validation)"


def line_limits(s: Session) -> str:
    assert s.hello is not None
    limit = s.hello["limits"]["max_line_bytes"]
    head, tail = b'{"cmd":"ping","id":"big","pad":"', b'"}\n'
    size = min(limit, 1 << 20)
    big = head + b"x" * (size - len(head) - len(tail) + 1) + tail
    s.send_raw(big)
    reply = s.track({"cmd": "ping", "id": "big"})
    s.wait(reply)
    if limit > 256 << 20:
        return f"a {size:,}-byte line read; max_line_bytes {limit:,} is too big to test"
    over = head + b"x" * (limit - len(head) - len(tail) + 2) + tail
    assert len(over) - 1 == limit + 1
    start = time.monotonic()
    s.send_raw(over)
    error = s.next_unaddressed(f"line_too_long for a line of {limit + 1:,} bytes")
    s.expect(error, {"type": "error", "code": "line_too_long", "id": ABSENT}, "an over-long line")
    took = time.monotonic() - start
    return f"{size:,}-byte line read; {limit + 1:,} bytes: line_too_long in {took:.1f} s"


def end_of_input_without_newline(s: Session) -> str:
    s.send_raw(b'{"cmd":"ping","id":"last"}', note='{"cmd":"ping","id":"last"} (no newline)')
    last = s.track({"cmd": "ping", "id": "last"})
    s.close_stdin()
    s.wait(last)
    _, seconds = s.expect_end(within=5.0)
    return f"the last line was read; exit 0 {seconds * 1000:.0f} ms after the output ended"


GROUP = Group(
    name="input",
    about="framing and bad input, no model",
    model=False,
    same_worker=True,
    cases=(
        Case(name="malformed lines: invalid_json", run=malformed_lines),
        Case(name="invalid_request names the field", run=invalid_fields),
        Case(name="unknown_command", run=unknown_command),
        Case(name="framing: CRLF, blank lines, batches", run=framing),
        Case(name="unknown fields ignored, null = absent", run=unknown_and_null_fields),
        Case(name="line sizes: 1 MiB ok, over limit refused", run=line_limits),
        Case(
            name="stdin EOF after a line without newline",
            run=end_of_input_without_newline,
            ends_worker=True,
        ),
    ),
)
