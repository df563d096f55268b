"""Every field of every request, with hostile values, against one real worker (issue 9, item 6).

The fields come from ``protocol.requests.REQUEST_FIELDS`` (every command
that is answered, every field it knows) plus the paths inside ``chat``:
each message field, content parts, image URLs, ``tools``, a tool call's
``function.arguments``, ``chat_template_kwargs``, ``logit_bias`` keys and
values and ``stop`` items. Each gets each hostile value: integers far
beyond 64 bits and below zero, 1e30, NaN-like strings, wrong types, NUL
characters, ``~nosuchuser`` paths, long strings, values nested deeper than
the limit, and nested deeper than orjson reads.

The invariants: no reply has code ``internal``; every request gets exactly
one terminal line, with its id (a line orjson cannot parse gets one
``invalid_json`` without id); stdout carries only JSON lines (the harness
checks each against the schema); and the worker still answers ``ping``.

The model is the tiny one with a template that renders tools and tool calls,
so that hostile tools reach a real chat template. Valid generations ask for
at most 2 tokens.
"""

from __future__ import annotations

import copy
import queue
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from bridge import demo_model
from protocol.requests import REQUEST_FIELDS
from tests.harness import WorkerProcess

pytestmark = pytest.mark.timeout(240)

Path_ = tuple[str | int, ...]

DEEP = 10_000
# Values orjson will not write, spliced into the line as JSON text.
DEEP_TOKEN = "\u0001deep-list\u0001"
DEEP_OBJECT_TOKEN = "\u0001deep-object\u0001"
BEYOND_64_BITS = "\u0001int-2-to-the-70\u0001"
RAW_TEXT = {
    DEEP_TOKEN: b"[" * DEEP + b"]" * DEEP,
    DEEP_OBJECT_TOKEN: b'{"k":' * DEEP + b"0" + b"}" * DEEP,
    BEYOND_64_BITS: str(2**70).encode(),  # orjson reads it as a float
}


def nested(depth: int) -> Any:
    value: Any = 0
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


HOSTILE: list[Any] = [
    2**63,
    BEYOND_64_BITS,
    2**64 - 1,
    -1,
    -(2**63),
    1e30,
    -1e30,
    0,
    1.5,
    5.0,
    "NaN",
    "Infinity",
    "-1",
    "",
    "\u0000",
    "a\u0000b",
    "~nosuchuser-h3/x",
    "x" * 1000,
    True,
    False,
    [],
    {},
    [1],
    ["\u0000"],
    {"a": 1},
    {"\u0000": None},
    [2**63],
    "[" * 200,
    nested(70),
    DEEP_TOKEN,
    DEEP_OBJECT_TOKEN,
]
# Only where the value never becomes part of a prompt (a long prompt would prefill
# for long: that is item 9's prompt cap, not this sweep's business).
LONG: list[Any] = ["y" * 1_000_000, "[" * 100_000 + "]" * 100_000]
NOT_PROMPT = {"stop", "cache_key", "path", "adapter_path", "dir", "role", "type", "url"}

SMALL = {"max_tokens": 2}
MESSAGE = {"role": "user", "content": "hi"}
BASES: dict[str, dict[str, Any]] = {
    "hello": {},
    "ping": {},
    "info": {},
    "generate": {"prompt": "hi", **SMALL},
    "chat": {"messages": [MESSAGE], **SMALL},
    "tokenize": {"text": "hi"},
    "detokenize": {"tokens": [1, 2]},
    "inspect": {"prompt": "hi"},
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "d",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
CHAT_FULL: dict[str, Any] = {
    "cmd": "chat",
    "messages": [
        {"role": "system", "content": "s", "name": "n"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "weather"},
                {"type": "text", "text": "?"},
            ],
        },
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ],
    "tools": TOOLS,
    "chat_template_kwargs": {"enable_thinking": False},
    "logit_bias": {"5": 1.0},
    "stop": ["zzz"],
    **SMALL,
}
CHAT_PATHS: list[Path_] = [
    ("messages",),
    ("messages", 0),
    *(("messages", 0, f) for f in ("role", "content", "name", "tool_calls", "tool_call_id")),
    ("messages", 1, "content"),
    ("messages", 1, "content", 0),
    ("messages", 1, "content", 0, "type"),
    ("messages", 1, "content", 0, "text"),
    ("messages", 1, "content", 1, "type"),
    ("messages", 2, "content"),
    ("messages", 2, "tool_calls"),
    ("messages", 2, "tool_calls", 0),
    ("messages", 2, "tool_calls", 0, "id"),
    ("messages", 2, "tool_calls", 0, "function"),
    ("messages", 2, "tool_calls", 0, "function", "name"),
    ("messages", 2, "tool_calls", 0, "function", "arguments"),
    ("messages", 3, "tool_call_id"),
    ("messages", 3, "content"),
    ("tools", 0),
    ("tools", 0, "type"),
    ("tools", 0, "function"),
    ("tools", 0, "function", "name"),
    ("tools", 0, "function", "description"),
    ("tools", 0, "function", "parameters"),
    ("tools", 0, "function", "parameters", "properties"),
    ("chat_template_kwargs", "enable_thinking"),
    ("logit_bias", "5"),
    ("stop", 0),
]
# Image parts end at vision_not_supported on a text model, so they get their own request.
CHAT_IMAGE: dict[str, Any] = {
    "cmd": "chat",
    "messages": [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}],
        }
    ],
    **SMALL,
}
IMAGE_PATHS: list[Path_] = [
    ("messages", 0, "content", 0),
    ("messages", 0, "content", 0, "type"),
    ("messages", 0, "content", 0, "image_url"),
    ("messages", 0, "content", 0, "image_url", "url"),
    ("messages", 0, "content", 0, "image"),
]
BIAS_KEYS = ["9" * 5000, "2147483648", "18446744073709551616", "-1", "NaN", "\u0000", "", "1e3"]


def with_value(request: dict[str, Any], path: Path_, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(request)
    target: Any = out
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return out


def hostile_values(path: Path_) -> list[Any]:
    values = list(HOSTILE)
    if path[-1] in NOT_PROMPT:
        values.extend(LONG)
    if path[-1] == "arguments":  # a JSON text nested 100,000 deep: refused before templating
        values.append(LONG[1])
    return values


def line_of(request: dict[str, Any]) -> bytes:
    """The request as one line, with the deep placeholders spliced in as JSON
    text (orjson will not write values nested that deep)."""
    line = orjson.dumps(request)
    for token, text in RAW_TEXT.items():
        line = line.replace(orjson.dumps(token), text)
    return line


def cases(tmp: Path, model: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(label, request without id) for every field and hostile value."""
    for cmd, base in BASES.items():
        for field in sorted(REQUEST_FIELDS[cmd] - {"cmd"}):
            for value in hostile_values((field,)):
                if field == "dir" and isinstance(value, str) and value[:1] not in ("/", "~"):
                    value = f"{tmp}/{value}"  # relative dirs would land in the repository
                yield f"{cmd}.{field}={value!r:.40}", {"cmd": cmd, **base, field: value}
    for path in CHAT_PATHS:
        for value in hostile_values(path):
            yield f"chat.{path}={value!r:.40}", with_value(CHAT_FULL, path, value)
    for path in IMAGE_PATHS:
        for value in hostile_values(path):
            yield f"chat.{path}={value!r:.40}", with_value(CHAT_IMAGE, path, value)
    for key in BIAS_KEYS:
        yield f"chat.logit_bias[{key!r:.20}]", {**CHAT_FULL, "logit_bias": {key: 1}}
    # load last: its hostile values leave the worker with no model, or another one
    for field in sorted(REQUEST_FIELDS["load"] - {"cmd", "id"}):  # ids: swept above
        for value in hostile_values((field,)):
            yield f"load.{field}={value!r:.40}", {"cmd": "load", "path": str(model), field: value}


@pytest.fixture(scope="module")
def tools_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_model.ensure(tmp_path_factory.mktemp("hostile") / "tiny", template="qwen_tools")


def test_every_field_with_hostile_values(tools_model: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    codes: Counter[str] = Counter()
    problems: list[str] = []
    with WorkerProcess("bridge") as worker:
        assert worker.call({"cmd": "load", "id": "setup", "path": str(tools_model)})["type"] == (
            "loaded"
        )
        for n, (label, request) in enumerate(cases(tmp_path, tools_model)):
            rid = f"h{n}"
            line = line_of({**request, "id": rid})
            try:
                orjson.loads(line)
                expected_id: str | None = rid
            except orjson.JSONDecodeError:
                expected_id = None  # unreadable: answered invalid_json, without id
            worker.send(line + b"\n")
            try:
                lines = worker.read_until_terminal(expected_id, timeout=60)
            except AssertionError as exc:  # a line for another id: a lost or extra line
                problems.append(f"{label}: {str(exc):.300}")
                break
            except queue.Empty:
                problems.append(f"{label}: no terminal line within 60 s")
                break
            terminal = lines[-1]
            code = str(terminal.get("code", terminal["type"]))
            codes[code] += 1
            if code == "internal":
                problems.append(f"{label}: internal: {terminal['error']:.300}")
            if expected_id is None and code != "invalid_json":
                problems.append(f"{label}: unreadable line answered {str(terminal):.300}")
        summary = f"{sum(codes.values())} requests in {time.monotonic() - started:.1f}s: {codes}"
        assert not problems, "\n".join(problems[:40]) + f"\n({len(problems)} problems; {summary})"
        assert codes["invalid_request"] > 500, summary  # the sweep did reach the parser
        # nothing more was written: every request had exactly one terminal line
        assert worker.call({"cmd": "ping", "id": "after"}) == {
            "type": "pong",
            "id": "after",
            "ok": True,
        }, "a line was left over"
        assert worker.proc.poll() is None
