"""A fresh worker with no model: handshake, ids, the no-model errors."""

from __future__ import annotations

from typing import Final

from ... import COMMANDS, OPTIONAL_COMMANDS, PROTOCOL_VERSION, SAMPLING_OPTIONS
from ..matching import ABSENT
from ..session import CaseSkipped, Session, fail
from ..table import Case, Group

__all__ = ["GROUP"]

ODD_IDS: Final[tuple[str | int, ...]] = (
    "p",
    7,
    0,
    -(2**63),
    2**64 - 1,
    "",
    "7",
    'ünï ✓ "quoted" \\ \n',
)
"""Ids the spec allows: strings (any), integers from -2^63 to 2^64-1."""

MODEL_REQUESTS: Final[tuple[dict[str, object], ...]] = (
    {"cmd": "generate", "prompt": "x"},
    {"cmd": "chat", "messages": [{"role": "user", "content": "x"}]},
    {"cmd": "tokenize", "text": "x"},
    {"cmd": "detokenize", "tokens": [1]},
    {"cmd": "info"},
)


def _no_model_loaded(s: Session) -> None:
    assert s.hello is not None
    if s.hello["model"] is not None:
        raise CaseSkipped(f"the worker started with a model ({s.hello['model']}); run it without")


def hello(s: Session) -> str:
    reply = s.hello
    assert reply is not None
    if reply["protocol_version"] != PROTOCOL_VERSION:
        raise fail(
            f"protocol_version {reply['protocol_version']}, the kit checks {PROTOCOL_VERSION}"
        )
    missing = [c for c in COMMANDS if c not in reply["commands"] and c not in OPTIONAL_COMMANDS]
    if missing:
        raise fail(f"hello's commands lack {missing}")
    missing = [o for o in SAMPLING_OPTIONS if o not in reply["sampling_options"]]
    if missing:
        raise fail(f"hello's sampling_options lack {missing}")
    legacy = s.legacy_call({"cmd": "hello"})
    s.expect(legacy, {"type": "hello", "id": ABSENT, "ok": True}, "legacy hello")
    if legacy["pid"] != reply["pid"]:
        raise fail(f"two hellos, two pids: {reply['pid']} and {legacy['pid']}")
    again = s.call({"cmd": "hello", "id": 0})
    s.expect(again, {"type": "hello", "id": 0}, "hello with id 0")
    limit = reply["limits"]["max_line_bytes"]
    return f"answered {s.hello_ms:.0f} ms after spawn; max_line_bytes {limit:,}"


def ping_and_ids(s: Session) -> str:
    for rid in ODD_IDS:
        reply = s.call({"cmd": "ping", "id": rid})
        s.expect(reply, {"type": "pong", "id": rid, "ok": True}, f"ping id {rid!r}")
    legacy = s.legacy_call({"cmd": "ping"})
    s.expect(legacy, {"type": "pong", "id": ABSENT, "ok": True}, "legacy ping")
    null = s.legacy_call({"cmd": "ping", "id": None})
    s.expect(null, {"type": "pong", "id": ABSENT}, '"id": null (the legacy dialect)')
    return f"{len(ODD_IDS)} ids echoed with their JSON type; id null is legacy"


def unload_nothing(s: Session) -> None:
    _no_model_loaded(s)
    reply = s.call({"cmd": "unload", "id": "u"})
    s.expect(reply, {"type": "unloaded", "id": "u", "ok": True, "was_loaded": False}, "unload")
    legacy = s.legacy_call({"cmd": "unload"})
    s.expect(legacy, {"type": "unloaded", "id": ABSENT, "was_loaded": False}, "legacy unload")


def no_model(s: Session) -> str:
    _no_model_loaded(s)
    for request in MODEL_REQUESTS:
        rid = s.fresh_id(str(request["cmd"]))
        reply = s.call({**request, "id": rid})
        s.expect(reply, {"type": "error", "id": rid, "code": "no_model"}, f"{request['cmd']}")
        legacy = s.legacy_call(request)
        s.expect(legacy, {"type": "error", "id": ABSENT, "code": "no_model"}, "legacy")
    return "generate, chat, tokenize, detokenize, info: no_model in both dialects"


def cancel_is_never_answered(s: Session) -> None:
    s.cancel("never-sent")
    s.cancel(12345)
    s.cancel()
    s.send({"cmd": "cancel", "id": "extra-fields", "reason": "ignored"})
    # the runner's sync ping after this case fails on any reply to these


GROUP = Group(
    name="startup",
    about="a fresh worker, no model",
    model=False,
    cases=(
        Case(name="hello: both dialects", run=hello),
        Case(name="ping: ids echoed with their type", run=ping_and_ids),
        Case(name="unload with nothing loaded", run=unload_nothing),
        Case(name="no_model before load", run=no_model),
        Case(name="cancel is never answered", run=cancel_is_never_answered),
    ),
)
