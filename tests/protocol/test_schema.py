"""The spec, the schema and the code agree.

- every ```json example line in docs/protocol.md is a valid request (it has
  "cmd") or a valid reply, and every request example decodes;
- every reply class encodes to a line that validates, with and without id;
- the schema's enums are the code's tuples, and its request ranges accept
  exactly what ``protocol.requests`` accepts;
- every command, reply type, error code and field is written up in the spec.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_args

import orjson
import pytest
from jsonschema import Draft202012Validator

from protocol.codec import PROTOCOL_VERSION, decode_request, encode
from protocol.errors import ERROR_CODES, InvalidRequest, RequestId, WireError
from protocol.replies import (
    FINISH_REASONS,
    AttentionFacts,
    BatchStats,
    Bye,
    Done,
    ErrorReply,
    HelloReply,
    InfoReply,
    Inspected,
    Loaded,
    MemoryStats,
    ModelFacts,
    Pong,
    ProgressEvent,
    Reply,
    TextReply,
    TokenEvent,
    TokensReply,
    TopLogprob,
    Unloaded,
)
from protocol.requests import COMMANDS, MAX_LOGPROBS, SAMPLING_OPTIONS, parse_request
from tests.schema_check import SCHEMA_PATH, schema, validate_reply, validate_request

SPEC_PATH = SCHEMA_PATH.with_name("protocol.md")
SPEC = SPEC_PATH.read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class Example:
    lineno: int
    text: str
    obj: dict[str, Any]

    def __str__(self) -> str:
        return f"protocol.md:{self.lineno}"


def _json_examples() -> list[Example]:
    """Every line of every ```json block; each must be one JSON object."""
    out: list[Example] = []
    in_block = False
    for lineno, line in enumerate(SPEC.splitlines(), start=1):
        fence = line.strip()
        if fence.startswith("```"):
            in_block = not in_block and fence == "```json"
            continue
        if in_block and line.strip():
            obj = json.loads(line)
            assert isinstance(obj, dict), f"protocol.md:{lineno}: not an object: {line}"
            out.append(Example(lineno, line, obj))
    return out


EXAMPLES = _json_examples()
REQUEST_EXAMPLES = [e for e in EXAMPLES if "cmd" in e.obj]
REPLY_EXAMPLES = [e for e in EXAMPLES if "cmd" not in e.obj]


def _defs() -> dict[str, Any]:
    defs: dict[str, Any] = schema()["$defs"]
    return defs


# -- the schema itself --------------------------------------------------------------


def test_the_packaged_schema_is_the_spec_schema() -> None:
    """``protocol/protocol.schema.json`` ships in the wheel for the conformance
    kit; it must be a byte-for-byte copy of the spec's schema."""
    packaged = SCHEMA_PATH.parents[1] / "protocol" / "protocol.schema.json"
    assert packaged.read_bytes() == SCHEMA_PATH.read_bytes(), (
        "cp docs/protocol.schema.json protocol/protocol.schema.json"
    )


def test_schema_is_valid_draft_2020_12() -> None:
    assert schema()["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema())


def test_schema_has_a_definition_per_command_and_reply_type() -> None:
    defs = _defs()
    assert defs["request"]["properties"]["cmd"]["enum"] == list(COMMANDS)
    assert [ref["$ref"] for ref in defs["request"]["oneOf"]] == [
        f"#/$defs/request_{cmd}" for cmd in COMMANDS
    ]
    reply_types = defs["reply"]["properties"]["type"]["enum"]
    assert sorted(reply_types) == sorted(_reply_type(cls) for cls in REPLY_CLASSES)
    assert [ref["$ref"] for ref in defs["reply"]["oneOf"]] == [
        f"#/$defs/reply_{t}" for t in reply_types
    ]


def test_error_codes_match() -> None:
    assert _defs()["error_code"]["enum"] == list(ERROR_CODES)


def test_finish_reasons_match() -> None:
    assert _defs()["finish_reason"]["enum"] == list(FINISH_REASONS)


@pytest.mark.parametrize("cmd", ["generate", "chat"])
def test_sampling_options_are_in_the_schema(cmd: str) -> None:
    properties = _defs()[f"request_{cmd}"]["properties"]
    assert set(SAMPLING_OPTIONS) <= set(properties)


def test_schema_logprobs_limit_matches_code() -> None:
    assert _defs()["request_generate"]["properties"]["logprobs"]["maximum"] == MAX_LOGPROBS


# -- the examples in the spec ---------------------------------------------------------


def test_spec_has_examples_for_every_message() -> None:
    assert {e.obj["cmd"] for e in REQUEST_EXAMPLES} == set(COMMANDS)
    assert {e.obj["type"] for e in REPLY_EXAMPLES} == {_reply_type(c) for c in REPLY_CLASSES}
    assert {e.obj["code"] for e in REPLY_EXAMPLES if e.obj["type"] == "error"} == set(ERROR_CODES)
    assert {e.obj["finish_reason"] for e in REPLY_EXAMPLES if e.obj["type"] == "done"} == set(
        FINISH_REASONS
    )


def test_spec_examples_cover_both_dialects() -> None:
    for examples in (REQUEST_EXAMPLES, REPLY_EXAMPLES):
        assert any("id" in e.obj for e in examples)
        assert any("id" not in e.obj for e in examples)


@pytest.mark.parametrize("example", REQUEST_EXAMPLES, ids=str)
def test_request_example_validates_and_decodes(example: Example) -> None:
    validate_request(example.obj)
    request = decode_request(example.text.encode("utf-8"))
    assert getattr(request, "id", None) == example.obj.get("id")


@pytest.mark.parametrize("example", REPLY_EXAMPLES, ids=str)
def test_reply_example_validates(example: Example) -> None:
    validate_reply(example.obj)


def test_the_schema_root_accepts_every_example() -> None:
    root = Draft202012Validator(schema())
    for example in EXAMPLES:
        errors = list(root.iter_errors(example.obj))
        assert not errors, f"{example}: {errors[0].message}"


def test_progress_true_needs_an_id_in_the_schema_and_the_parser() -> None:
    for cmd in ("generate", "chat", "load"):
        for extra, ok in (
            ({}, False),
            ({"id": None}, False),
            ({"id": "r"}, True),
            ({"id": 0}, True),
        ):
            raw = {**BASES[cmd], "progress": True, **extra}
            assert _schema_accepts(raw) is ok and _parser_accepts(raw) is ok, (cmd, extra)
        assert _schema_accepts({**BASES[cmd], "progress": False})


def test_hello_example_matches_the_code() -> None:
    hello = next(e.obj for e in REPLY_EXAMPLES if e.obj["type"] == "hello")
    assert hello["protocol_version"] == PROTOCOL_VERSION
    assert hello["commands"] == list(COMMANDS)
    assert hello["sampling_options"] == list(SAMPLING_OPTIONS)
    assert hello["limits"]["max_logprobs"] == MAX_LOGPROBS


# -- the spec documents everything -------------------------------------------------------


@pytest.mark.parametrize("code", ERROR_CODES)
def test_error_code_is_documented(code: str) -> None:
    assert re.search(rf"^\| `{code}` \|", SPEC, re.MULTILINE), f"no row for `{code}`"


@pytest.mark.parametrize("cmd", COMMANDS)
def test_command_has_a_section(cmd: str) -> None:
    assert f"\n### `{cmd}`\n" in SPEC


def _documented_fields() -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for name, definition in _defs().items():
        if name.startswith(("request_", "reply_")) and name not in ("request_id", "reply_id"):
            out.extend((name, field) for field in definition.get("properties", {}))
    for name in ("chat_message", "content_part"):
        out.extend((name, field) for field in _defs()[name]["properties"])
    return out


@pytest.mark.parametrize(("definition", "field"), _documented_fields())
def test_every_schema_field_is_in_the_spec(definition: str, field: str) -> None:
    assert f"`{field}`" in SPEC, f"{definition}.{field} is not written up in protocol.md"


# -- every reply the code can emit validates ------------------------------------------------

FACTS = ModelFacts(
    path="/models/qwen3",
    model_type="qwen3",
    vocab_size=151936,
    layers=28,
    hidden_size=1024,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    context_len=40960,
    dtype="bfloat16",
    quantization={"group_size": 64, "bits": 4},
    parameters=596049920,
)
FACTS_MINIMAL = ModelFacts(
    path="/tmp/tiny",
    model_type="llama",
    vocab_size=2048,
    layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=16,
    context_len=None,
    dtype="float32",
    quantization=None,
    parameters=205184,
    vision=True,
)
ATTENTION = AttentionFacts(
    dir="/tmp/mlx-bridge-inspect-abc",
    num_layers=28,
    num_kv_heads=8,
    num_q_heads=16,
    seq_len=7,
    head_dim=128,
    architecture="qwen3",
)
MEMORY = MemoryStats(active_bytes=820744, peak_bytes=1068916, cache_bytes=284, rss_bytes=98205696)

ReplyFactory = Callable[[RequestId | None], list[Reply]]


def _hello(rid: RequestId | None) -> list[Reply]:
    common: dict[str, Any] = {
        "protocol_version": PROTOCOL_VERSION,
        "versions": {"bridge": "0.1.0", "mlx": "0.32.4", "mlx-lm": "0.32.2"},
        "commands": COMMANDS,
        "sampling_options": SAMPLING_OPTIONS,
        "limits": {"max_line_bytes": 64 << 20, "max_queue": 256, "max_logprobs": MAX_LOGPROBS},
        "pid": 4242,
    }
    return [HelloReply(id=rid, **common), HelloReply(id=rid, model="/models/qwen3", **common)]


def _tokens(rid: RequestId | None) -> list[Reply]:
    top = (
        TopLogprob(token_id=302, token="ing", logprob=-0.004),
        TopLogprob(token_id=542, token=" use", logprob=-5.69),
    )
    return [
        TokenEvent(id=rid, token="ing", token_id=302),
        TokenEvent(id=rid, token="", token_id=0),
        TokenEvent(id=rid, token="é\n\u2028<|im_end|>", token_id=1),
        TokenEvent(id=rid, token="ing", token_id=302, logprob=-0.004, top_logprobs=top),
        TokenEvent(id=rid, token="x", token_id=7, logprob=float("-inf"), top_logprobs=()),
    ]


def _done(rid: RequestId | None) -> list[Reply]:
    finished = [
        Done(
            id=rid,
            finish_reason=reason,
            tokens_generated=5,
            prompt_tokens=11,
            prompt_tps=836.3291234,
            generation_tps=413.04,
            ttft_ms=14.853,
            queue_ms=0.228,
            peak_memory_bytes=988780,
        )
        for reason in FINISH_REASONS
    ]
    queued_cancel = Done(
        id=rid,
        finish_reason="cancelled",
        tokens_generated=0,
        prompt_tokens=0,
        prompt_tps=0.0,
        generation_tps=0.0,
        ttft_ms=None,
        peak_memory_bytes=0,
    )
    return [*finished, queued_cancel]


def _progress(rid: RequestId | None) -> list[Reply]:
    """Progress goes only to addressed requests: without an id there is none."""
    if rid is None:
        return []
    return [
        ProgressEvent(id=rid, stage="prefill", done=512, total=8000),
        ProgressEvent(id=rid, stage="prefill", done=0, total=0),
        ProgressEvent(id=rid, stage="load", step="checking", done=7, total=7, unit="files"),
        ProgressEvent(id=rid, stage="load", step="weights", done=0, total=2**40, unit="bytes"),
        ProgressEvent(id=rid, stage="load", step="tokenizer"),
        ProgressEvent(id=rid, stage="load", step="ready"),
    ]


BATCH = BatchStats(
    running=3,
    prefilling=1,
    queued=0,
    max_concurrency=32,
    kv_reserved_bytes=6291456,
    kv_budget_bytes=None,
    steps=1804,
    last_step_ms=4.21749,
    tokens_per_s=711.4,
)


def _errors(rid: RequestId | None) -> list[Reply]:
    replies: list[Reply] = [
        ErrorReply(id=rid, code=code, message=f"{code}: example") for code in ERROR_CODES
    ]
    replies.append(ErrorReply.of(InvalidRequest("temperature: must be a number"), rid))
    return replies


REPLY_FACTORIES: dict[type[Any], ReplyFactory] = {
    HelloReply: _hello,
    Pong: lambda rid: [Pong(id=rid)],
    Loaded: lambda rid: [
        Loaded(id=rid, model=FACTS, load_ms=54.6931),
        Loaded(id=rid, model=FACTS_MINIMAL, load_ms=0.0),
    ],
    Unloaded: lambda rid: [Unloaded(id=rid, was_loaded=True), Unloaded(id=rid, was_loaded=False)],
    TokenEvent: _tokens,
    ProgressEvent: _progress,
    Done: _done,
    InfoReply: lambda rid: [
        InfoReply(id=rid, model=FACTS, memory=MEMORY),
        InfoReply(id=rid, model=FACTS_MINIMAL, memory=MEMORY),
        InfoReply(id=rid, model=FACTS, memory=MEMORY, batch=BATCH),
        InfoReply(
            id=rid, model=FACTS, memory=MEMORY, batch=dataclasses.replace(BATCH, kv_budget_bytes=0)
        ),
    ],
    TokensReply: lambda rid: [
        TokensReply(id=rid, tokens=(1530, 361, 866)),
        TokensReply(id=rid, tokens=()),
    ],
    TextReply: lambda rid: [TextReply(id=rid, text="<|im_start|>hi"), TextReply(id=rid, text="")],
    Inspected: lambda rid: [Inspected(id=rid, attention=ATTENTION)],
    Bye: lambda rid: [Bye(id=rid)],
    ErrorReply: _errors,
}
REPLY_CLASSES: tuple[type[Any], ...] = get_args(Reply)


def _reply_type(cls: type[Any]) -> str:
    reply = REPLY_FACTORIES[cls](1)[0]
    kind = reply.to_wire()["type"]
    assert isinstance(kind, str)
    return kind


def test_every_reply_class_has_a_factory() -> None:
    assert set(REPLY_FACTORIES) == set(REPLY_CLASSES)


@pytest.mark.parametrize("rid", [None, "req-1", "", 0, 7, -3, 2**63, "ünï\u2028"], ids=repr)
@pytest.mark.parametrize("cls", REPLY_CLASSES, ids=lambda c: c.__name__)
def test_encoded_reply_validates(cls: type[Any], rid: RequestId | None) -> None:
    for reply in REPLY_FACTORIES[cls](rid):
        line = encode(reply)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        obj = orjson.loads(line)
        validate_reply(obj)
        if rid is None:
            assert "id" not in obj
        else:
            assert obj["id"] == rid and type(obj["id"]) is type(rid)


# -- the schema's request ranges are the parser's --------------------------------------------

WRONG_TYPES: list[object] = ["x", "", True, False, [], [1], {}, {"a": 1}]
NUMBERS: list[object] = [-1, -0.5, 0, 0.0, 0.25, 1, 1.0, 1.5, 2, 19, 20, 21, 2048, 1e9, -1e9]
PROBES = WRONG_TYPES + NUMBERS

BASES: dict[str, dict[str, Any]] = {
    "hello": {"cmd": "hello"},
    "load": {"cmd": "load", "path": "/models/m"},
    "generate": {"cmd": "generate", "prompt": "hi"},
    "chat": {"cmd": "chat", "messages": [{"role": "user", "content": "hi"}]},
    "tokenize": {"cmd": "tokenize", "text": "hi"},
    "detokenize": {"cmd": "detokenize", "tokens": [1]},
    "inspect": {"cmd": "inspect", "prompt": "hi"},
}
PROBED_FIELDS: list[tuple[str, str]] = [
    *(("generate", f) for f in SAMPLING_OPTIONS),
    *(("chat", f) for f in SAMPLING_OPTIONS),
    ("chat", "chat_template_kwargs"),
    ("generate", "prompt"),
    ("load", "path"),
    ("load", "adapter_path"),
    ("load", "context_len"),
    ("load", "trust_remote_code"),
    ("load", "force"),
    ("load", "gpu_layers"),
    ("load", "parallel_slots"),
    ("load", "progress"),
    ("generate", "progress"),
    ("chat", "progress"),
    ("tokenize", "text"),
    ("tokenize", "add_special_tokens"),
    ("detokenize", "tokens"),
    ("inspect", "prompt"),
    ("inspect", "dir"),
    ("hello", "id"),
]
EXTRA_PROBES: dict[str, list[object]] = {
    "stop": ["END", ["a", "b"], ["a", ""], ["a", 1], [None]],
    "logit_bias": [
        {"5": 1.5},
        {"0": -100},
        {"5": "x"},
        {"x": 1},
        {"-1": 1},
        {"5": None},
        {"2147483647": 1},
        {"2147483648": 1},
        {"0002147483647": 1},
        {"9" * 5000: 1},
    ],
    "tokens": [[0, 1, 2], [-1], [True], ["1"], [2**31 - 1], [2**31], [2**63]],
    "seed": [2**63, 2**64 - 1],
    "id": ["req-1", 2**63, -(2**63)],
    "path": ["/a\0b", "\0"],
    "adapter_path": ["/a\0b"],
    "dir": ["/tmp/a\0b"],
}
# Every integer field, at and beyond its bounds.
INT_PROBES: list[object] = [2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**63, 2**64 - 1, 1e20, -1e20]


def _known_divergence(field: str, value: object) -> bool:
    """JSON Schema cannot tell 1 from 1.0. Integer fields read 1.0 as 1, except
    ``id`` (echoed exactly as sent, so it must be an integer) and token ids
    (``detokenize`` refuses ``[5.0]``)."""
    if field == "tokens" and isinstance(value, list):
        return any(isinstance(v, float) and v.is_integer() for v in value)
    return field == "id" and isinstance(value, float) and value.is_integer()


def _parser_accepts(raw: dict[str, Any]) -> bool:
    try:
        parse_request(raw)
    except WireError as exc:
        assert isinstance(exc, InvalidRequest), exc
        return False
    return True


def _schema_accepts(raw: dict[str, Any]) -> bool:
    try:
        validate_request(raw)
    except AssertionError:
        return False
    return True


@pytest.mark.parametrize(("cmd", "field"), PROBED_FIELDS, ids=lambda v: str(v))
def test_schema_and_parser_accept_the_same_values(cmd: str, field: str) -> None:
    values = [*PROBES, *INT_PROBES, None, *EXTRA_PROBES.get(field, [])]
    if field == "tokens":
        values += [[v] for v in NUMBERS + INT_PROBES]
    disagreements = []
    for value in values:
        raw = {**BASES[cmd], field: value}
        parser, schema_ok = _parser_accepts(raw), _schema_accepts(raw)
        if parser != schema_ok and not _known_divergence(field, value):
            disagreements.append(
                f"{field}={json.dumps(value)}: parser {parser}, schema {schema_ok}"
            )
    assert not disagreements, "\n".join(disagreements)


@pytest.mark.parametrize(
    "part",
    [
        {"type": "text", "text": "hi"},
        {"type": "text", "text": ""},
        {"type": "text"},
        {"type": "text", "text": 5},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "image_url", "image_url": {"url": ""}},
        {"type": "image_url", "image_url": {}},
        {"type": "image_url", "image_url": "file:///tmp/cat.png"},
        {"type": "image_url", "image_url": ""},
        {"type": "image_url", "image_url": 5},
        {"type": "image_url"},
        {"type": "image", "image": "/tmp/cat.png"},
        {"type": "image", "image": ""},
        {"type": "image", "image": "/tmp/a\0.png"},
        {"type": "image_url", "image_url": {"url": "/tmp/\0"}},
        {"type": "image_url", "image_url": "\0"},
        {"type": "image", "image_url": None, "image": "/tmp/cat.png"},
        {"type": "audio", "audio": "x"},
        {"type": 5},
        {},
        "text",
    ],
    ids=lambda p: json.dumps(p),
)
def test_schema_and_parser_agree_on_content_parts(part: object) -> None:
    raw = {"cmd": "chat", "messages": [{"role": "user", "content": [part]}]}
    assert _parser_accepts(raw) == _schema_accepts(raw)


@pytest.mark.parametrize(
    "message",
    [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1", "name": "get_weather"},
        {"role": "user"},
        {"role": "wizard", "content": "hi"},
        {"role": "developer", "content": "hi"},
        {"role": "system", "content": ""},
        {"role": "tool", "content": None},
        {"role": "assistant"},
        {"role": "assistant", "tool_calls": []},
        {"role": "assistant", "tool_calls": [{"id": "c1"}]},
        {"role": "assistant", "content": "x", "tool_calls": None},
        {"role": "user", "tool_calls": [{"id": "c1"}]},
        {"role": ""},
        {"content": "hi"},
        {"role": 1},
        {"role": "user", "content": 5},
        {"role": "user", "name": 5},
        {"role": "user", "tool_calls": {}},
        {"role": "user", "tool_call_id": 5},
        "hi",
    ],
    ids=lambda m: json.dumps(m),
)
def test_schema_and_parser_agree_on_messages(message: object) -> None:
    raw = {"cmd": "chat", "messages": [message]}
    assert _parser_accepts(raw) == _schema_accepts(raw)


def test_schema_and_parser_reject_empty_messages() -> None:
    raw = {"cmd": "chat", "messages": []}
    assert not _parser_accepts(raw) and not _schema_accepts(raw)
