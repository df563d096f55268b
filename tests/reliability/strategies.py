"""Hypothesis strategies for whole input batches: bytes, JSON, hostile requests, interleavings.

Every strategy draws a list of lines (each ending in ``\\n`` or ``\\r\\n``)
and pauses (floats, seconds) for ``FuzzWorker.exchange``. ``confine`` keeps
what the fuzzer may write (``inspect``'s ``dir``) inside the worker's
working directory, and leaves ``quit`` out (it is tested on its own).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import orjson
from hypothesis import strategies as st

from protocol.requests import COMMANDS
from tests.reliability.hostile import COMMAND_FIELDS, HOSTILE, INSPECT_SMALL, encode, put
from tests.reliability.wire import MAX_LINE_BYTES

Item = bytes | float


class Batch(list[Item]):
    """A drawn batch, with a short repr (values can be 200 KB long)."""

    def __repr__(self) -> str:
        text = super().__repr__()
        return text if len(text) <= 2000 else f"{text[:2000]}… ({len(text)} chars)"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


LINE_ENDS = st.sampled_from([b"\n", b"\n", b"\n", b"\r\n"])
FIELD_NAMES = sorted(
    {"id", "cmd", "prompt", "messages", "text", "tokens", "path", "dir", "max_tokens", "stop"}
    | {str(spec.path[0]) for specs in COMMAND_FIELDS.values() for spec in specs}
)
# Ids shared across a batch, so that duplicates and cancels hit their targets.
IDS = st.sampled_from(["a", "b", 1, 0, -1, "", 2**63 - 1, "é"])
FRAGMENTS = st.sampled_from(
    [
        b'{"cmd":"',
        b'{"cmd":"generate","id":',
        b'{"id":',
        b"[",
        b"{",
        b'"',
        b"\\u0000",
        b"\\ud800",
        b"\xff",
        b"\xc3",
        b" ",
        b"\x00",
        b"}",
        b"]",
        b",",
        b":",
        b"NaN",
        b"1e999",
    ]
)


def _line(body: bytes, end: bytes) -> bytes:
    return body.replace(b"\n", b" ") + end


@st.composite
def raw_lines(draw: st.DrawFn) -> bytes:
    """Random bytes, mutilated JSON, or a line near the line limit."""
    end = draw(LINE_ENDS)
    choice = draw(st.integers(0, 9))
    if choice <= 3:
        return _line(draw(st.binary(max_size=120)), end)
    if choice <= 7:  # JSON with bytes cut out or spliced in
        body = bytearray(encode(draw(requests()))[:-1])
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(0, len(body)))
            if draw(st.booleans()):
                body[at : at + draw(st.integers(0, 4))] = b""
            else:
                body[at:at] = draw(FRAGMENTS | st.binary(min_size=1, max_size=3))
        return _line(bytes(body), end)
    # A ping padded to within a few bytes of the limit (which excludes the line ending).
    size = MAX_LINE_BYTES + draw(st.integers(-2, 2))
    head = b'{"cmd":"ping","id":"pad","pad":"'
    return head + b"a" * (size - len(head) - 2) + b'"}' + end


JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=12,
)


@st.composite
def json_lines(draw: st.DrawFn) -> bytes:
    """Any JSON value; mostly an object with a command and fields of random values."""
    value: object
    if draw(st.integers(0, 4)) == 0:
        value = draw(JSON_VALUES)
    else:
        obj: dict[str, object] = draw(
            st.dictionaries(
                st.sampled_from(FIELD_NAMES) | st.text(max_size=6), JSON_VALUES, max_size=6
            )
        )
        obj["cmd"] = draw(st.sampled_from([c for c in COMMANDS if c != "quit"]) | JSON_SCALARS)
        if draw(st.booleans()):
            obj["id"] = draw(IDS | JSON_SCALARS)
        value = obj
    return encode(value, ascii_only=draw(st.booleans()))[:-1] + draw(LINE_ENDS)


_BASES: dict[str, dict[str, object]] = {}


def set_bases(bases: dict[str, dict[str, object]]) -> None:
    """The valid requests that ``requests()`` starts from (model path, work dir)."""
    _BASES.clear()
    _BASES.update(bases)


@st.composite
def requests(draw: st.DrawFn) -> dict[str, object]:
    """A valid request with zero to three fields set to hostile values."""
    cmds = sorted(_BASES) or ["tokenize"]
    cmd = draw(st.sampled_from([*cmds, "hello", "ping", "info", "unload"]))
    request: dict[str, object] = dict(_BASES.get(cmd, {"cmd": cmd, "text": "x"}))
    request["cmd"] = cmd
    specs = COMMAND_FIELDS.get(cmd, ())
    for _ in range(draw(st.integers(0, 3)) if specs else 0):
        spec = draw(st.sampled_from(specs))
        name, value = draw(st.sampled_from(HOSTILE))
        if spec.cmd == "inspect" and spec.path == ("prompt",) and name in INSPECT_SMALL:
            continue  # see hostile.INSPECT_SMALL
        try:
            request = put(request, spec.path, value)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier value replaced the container this path goes into
    return request


@st.composite
def interleaved(draw: st.DrawFn) -> Batch:
    """Hostile requests with ids from a small shared pool, cancels of them, cancels of
    everything, duplicates, legacy requests, and short pauses between lines."""
    items = Batch()
    sent: list[bytes] = []
    for _ in range(draw(st.integers(1, 8))):
        action = draw(
            st.sampled_from(["request"] * 4 + ["cancel", "cancel all", "duplicate", "pause"])
        )
        if action == "request":
            request = draw(requests())
            rid = draw(st.none() | IDS | st.just(f"u{len(sent)}"))
            if rid is not None:
                request["id"] = rid
            line = encode(request)
            sent.append(line)
            items.append(line)
        elif action == "cancel":
            target: object = draw(IDS | st.just("nobody"))
            aim = draw(st.booleans())
            if sent and aim:
                try:
                    target = orjson.loads(draw(st.sampled_from(sent))).get("id", target)
                except orjson.JSONDecodeError:
                    pass  # a hostile value made that line invalid JSON
            items.append(orjson.dumps({"cmd": "cancel", "id": target}) + b"\n")
        elif action == "cancel all":
            items.append(b'{"cmd":"cancel"}\n')
        elif action == "duplicate" and sent:
            items.append(draw(st.sampled_from(sent)))
        elif action == "pause":
            items.append(draw(st.sampled_from([0.0, 0.005, 0.02, 0.1])))
    return items


def batches(line: st.SearchStrategy[bytes], max_size: int = 8) -> st.SearchStrategy[Batch]:
    return st.lists(line, min_size=1, max_size=max_size).map(Batch)


def confine(items: Sequence[Item], workdir: str) -> list[Item]:
    """The batch with quit left out and every ``inspect`` dir moved under ``workdir``."""
    out: list[Item] = []
    for item in items:
        if isinstance(item, float):
            out.append(item)
            continue
        try:
            obj = orjson.loads(item)
        except orjson.JSONDecodeError:
            out.append(item)
            continue
        if isinstance(obj, dict):
            if obj.get("cmd") == "quit":
                continue
            where = obj.get("dir")
            if obj.get("cmd") == "inspect" and isinstance(where, str) and where.strip():
                target = os.path.join(workdir, os.path.expanduser(where))
                if not os.path.normpath(target).startswith(workdir + os.sep):
                    obj["dir"] = os.path.join(workdir, "confined", where.lstrip("/.~"))
                    item = encode(obj)
        out.append(item)
    return out
