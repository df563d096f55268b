"""Property tests for the codec and the request parser.

Whatever bytes arrive, ``decode_request`` either returns a request or raises
a ``WireError``; valid requests keep their values; bad fields are named.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.codec import decode_json, decode_request, encode, encode_wire
from protocol.errors import InvalidJson, InvalidRequest, UnknownCommand, WireError
from protocol.replies import ErrorReply, TokenEvent
from protocol.requests import (
    COMMANDS,
    DEFAULT_MAX_TOKENS,
    MAX_LOGPROBS,
    ROLES,
    SAMPLING_OPTIONS,
    Chat,
    Generate,
    ImagePart,
    Sampling,
    TextPart,
    parse_request,
)

# Integers as they come off the wire: orjson reads -2**63 .. 2**64-1 as ints
# (anything larger becomes a float).
WIRE_INTS = st.integers(min_value=-(2**63), max_value=2**64 - 1)
FINITE = st.floats(allow_nan=False, allow_infinity=False)
JSON_SCALARS = st.none() | st.booleans() | WIRE_INTS | FINITE | st.text(max_size=20)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
FIELD_NAMES = sorted(
    {
        *SAMPLING_OPTIONS,
        "id",
        "prompt",
        "messages",
        "chat_template_kwargs",
        "path",
        "adapter_path",
        "context_len",
        "trust_remote_code",
        "force",
        "gpu_layers",
        "parallel_slots",
        "text",
        "add_special_tokens",
        "tokens",
        "dir",
        "mock",
    }
)
REQUEST_IDS = st.text(max_size=12) | WIRE_INTS

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _line(obj: object) -> bytes:
    return json.dumps(obj).encode("utf-8")


def _decode_or_wire_error(line: bytes) -> WireError | None:
    try:
        decode_request(line)
    except WireError as exc:
        return exc
    return None


# -- nothing but WireError, whatever arrives ---------------------------------------------


@FAST
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_wire_errors(line: bytes) -> None:
    _decode_or_wire_error(line)


@FAST
@given(st.lists(st.sampled_from([b"{", b"}", b'"cmd"', b":", b",", b'"ping"', b"\xff", b" "])))
def test_json_shaped_garbage_raises_only_wire_errors(pieces: list[bytes]) -> None:
    _decode_or_wire_error(b"".join(pieces))


@FAST
@given(JSON_VALUES)
def test_arbitrary_json_raises_only_wire_errors(value: object) -> None:
    error = _decode_or_wire_error(_line(value))
    if not isinstance(value, dict):
        assert isinstance(error, InvalidJson)
        assert error.message.startswith("a request must be a JSON object")


@FAST
@given(
    cmd=st.sampled_from(COMMANDS) | st.text(max_size=10) | JSON_SCALARS,
    known=st.dictionaries(st.sampled_from(FIELD_NAMES), JSON_VALUES, max_size=6),
    extra=st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=3),
)
def test_arbitrary_objects_with_a_cmd_raise_only_wire_errors(
    cmd: object, known: dict[str, object], extra: dict[str, object]
) -> None:
    raw = {**extra, **known, "cmd": cmd}
    error = _decode_or_wire_error(_line(raw))
    rid = raw.get("id")
    readable_id = rid is None or isinstance(rid, str) or type(rid) is int
    if not readable_id:
        assert isinstance(error, InvalidRequest) and error.message.startswith("id: ")
    elif not isinstance(cmd, str):
        assert isinstance(error, InvalidRequest) and error.message.startswith("cmd: ")
    elif cmd not in COMMANDS:
        assert isinstance(error, UnknownCommand)
        assert error.message.startswith("cmd: unknown command")
    if error is not None:
        assert error.request_id == (rid if readable_id else None)
    # parse_request on the already-decoded object behaves the same
    try:
        parse_request(raw)
    except WireError as exc:
        assert error is not None and type(exc) is type(error)
    else:
        assert error is None


@FAST
@given(
    st.sampled_from(["generate", "chat"]),
    st.dictionaries(st.sampled_from(SAMPLING_OPTIONS), JSON_VALUES, min_size=1, max_size=4),
)
def test_random_sampling_values_raise_only_invalid_request(
    cmd: str, options: dict[str, object]
) -> None:
    base: dict[str, object] = (
        {"prompt": "hi"} if cmd == "generate" else {"messages": [{"role": "user", "content": "hi"}]}
    )
    error = _decode_or_wire_error(_line({"cmd": cmd, **base, **options, "id": "r"}))
    if error is not None:
        assert isinstance(error, InvalidRequest)
        assert error.request_id == "r"
        assert error.message.split(": ", 1)[0].split("[")[0].split(".")[0] in SAMPLING_OPTIONS


def test_oversized_integers_become_floats_and_are_rejected_as_ids() -> None:
    error = _decode_or_wire_error(b'{"cmd":"ping","id":18446744073709551616}')
    assert isinstance(error, InvalidRequest)
    assert error.message == "id: must be a string or an integer, got a number"
    assert error.request_id is None


def test_parse_request_with_a_huge_python_int() -> None:
    with pytest.raises(InvalidRequest):
        parse_request({"cmd": "generate", "prompt": "x", "temperature": 10**400})


def test_seed_beyond_64_bits_is_rejected() -> None:
    with pytest.raises(InvalidRequest, match=r"^seed: "):
        decode_request(b'{"cmd":"generate","prompt":"x","seed":18446744073709551616}')


# -- framing ------------------------------------------------------------------------------


@pytest.mark.parametrize("ending", [b"", b"\n", b"\r\n", b"  \n"])
def test_line_endings(ending: bytes) -> None:
    assert decode_request(b'{"cmd":"ping","id":3}' + ending) == decode_request(
        b'{"cmd":"ping","id":3}'
    )


@pytest.mark.parametrize(
    ("line", "start"),
    [
        (b"not json", "line is not valid JSON: "),
        (b"", "line is not valid JSON: "),
        (b'{"cmd":"ping"', "line is not valid JSON: "),
        (b'{"cmd":"\xff"}', "line is not valid UTF-8 (byte 0xff at offset 8)"),
        (b"[1,2]", "a request must be a JSON object, got a list"),
        (b'"ping"', "a request must be a JSON object, got a string"),
        (b"null", "a request must be a JSON object, got null"),
        (b"1e400", "line is not valid JSON: "),
        (b'{"cmd":"ping","x":NaN}', "line is not valid JSON: "),
    ],
)
def test_invalid_json_messages(line: bytes, start: str) -> None:
    with pytest.raises(InvalidJson) as info:
        decode_request(line)
    assert info.value.message.startswith(start)
    assert info.value.request_id is None


@FAST
@given(st.text(max_size=50), REQUEST_IDS)
def test_token_lines_round_trip_through_the_encoder(text: str, rid: str | int) -> None:
    line = encode(TokenEvent(id=rid, token=text, token_id=5))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert orjson.loads(line) == {"type": "token", "id": rid, "token": text, "token_id": 5}


def test_encoder_survives_lone_surrogates() -> None:
    line = encode(ErrorReply(id="s", code="internal", message="bad \ud800 text"))
    obj = orjson.loads(line)
    assert obj["code"] == "internal" and obj["id"] == "s"
    assert obj["error"] == "bad \ufffd text"


def test_encoder_writes_non_finite_floats_as_null() -> None:
    assert orjson.loads(encode_wire({"type": "x", "v": float("-inf")})) == {"type": "x", "v": None}


# -- valid requests keep their values ------------------------------------------------------

SAMPLING_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "max_tokens": st.integers(min_value=1, max_value=2**31 - 1),
    "temperature": st.floats(min_value=0, max_value=10),
    "top_p": st.floats(min_value=0, max_value=1),
    "top_k": st.integers(min_value=0, max_value=1000),
    "min_p": st.floats(min_value=0, max_value=1),
    "repetition_penalty": st.floats(min_value=0, max_value=3),
    "repeat_penalty": st.floats(min_value=0, max_value=3),
    "repetition_context_size": st.integers(min_value=1, max_value=4096),
    "logit_bias": st.dictionaries(
        st.integers(min_value=0, max_value=200_000).map(str), FINITE, max_size=4
    ),
    "seed": st.integers(min_value=0, max_value=2**64 - 1),
    "stop": st.text(min_size=1, max_size=8) | st.lists(st.text(min_size=1, max_size=8), max_size=4),
    "logprobs": st.integers(min_value=0, max_value=MAX_LOGPROBS),
}
SAMPLING_DICTS = st.fixed_dictionaries(
    {}, optional={name: strategy for name, strategy in SAMPLING_VALUES.items()}
)


def _expected_sampling(options: dict[str, Any]) -> Sampling:
    penalty = options.get("repetition_penalty") or options.get("repeat_penalty") or None
    stop = options.get("stop", ())
    return Sampling(
        max_tokens=options.get("max_tokens", DEFAULT_MAX_TOKENS),
        temperature=options.get("temperature", 0.0),
        top_p=options.get("top_p") or 1.0,
        top_k=options.get("top_k", 0),
        min_p=options.get("min_p", 0.0),
        repetition_penalty=penalty,
        repetition_context_size=options.get("repetition_context_size", 20),
        logit_bias=tuple((int(k), v) for k, v in options.get("logit_bias", {}).items()),
        seed=options.get("seed"),
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
        logprobs=options.get("logprobs", 0),
    )


@FAST
@given(st.text(max_size=40), SAMPLING_DICTS, st.none() | REQUEST_IDS)
def test_generate_round_trips(prompt: str, options: dict[str, Any], rid: str | int | None) -> None:
    raw = {"cmd": "generate", "prompt": prompt, **options}
    if rid is not None:
        raw["id"] = rid
    request = decode_request(_line(raw))
    assert request == Generate(id=rid, prompt=prompt, sampling=_expected_sampling(options))


PATHS = st.text(min_size=1).filter(lambda u: "\0" not in u)
TEXT_PARTS = st.builds(lambda t: {"type": "text", "text": t}, st.text(max_size=10))
IMAGE_PARTS = st.one_of(
    st.builds(lambda u: {"type": "image_url", "image_url": {"url": u}}, PATHS),
    st.builds(lambda u: {"type": "image_url", "image_url": u}, PATHS),
    st.builds(lambda u: {"type": "image", "image": u}, PATHS),
)
MESSAGES = st.fixed_dictionaries(
    {
        "role": st.sampled_from(ROLES),
        "content": st.text(max_size=20) | st.lists(TEXT_PARTS | IMAGE_PARTS),
    },
    optional={
        "name": st.text(max_size=8),
        "tool_calls": st.lists(JSON_VALUES, max_size=2),
        "tool_call_id": st.text(max_size=8),
    },
)


def _image_url(part: dict[str, Any]) -> str:
    image = part.get("image_url")
    if isinstance(image, dict):
        url = image["url"]
    else:
        url = image or part["image"]
    assert isinstance(url, str)
    return url


@FAST
@given(
    st.lists(MESSAGES, min_size=1, max_size=4),
    SAMPLING_DICTS,
    st.none() | st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=3),
    REQUEST_IDS,
)
def test_chat_round_trips(
    messages: list[dict[str, Any]],
    options: dict[str, Any],
    kwargs: dict[str, Any] | None,
    rid: str | int,
) -> None:
    raw = {"cmd": "chat", "id": rid, "messages": messages, **options}
    if kwargs is not None:
        raw["chat_template_kwargs"] = kwargs
    request = decode_request(_line(raw))
    assert isinstance(request, Chat)
    assert request.id == rid
    assert request.sampling == _expected_sampling(options)
    assert request.chat_template_kwargs == kwargs
    assert len(request.messages) == len(messages)
    for parsed, sent in zip(request.messages, messages, strict=True):
        assert parsed.role == sent["role"]
        assert parsed.name == sent.get("name")
        assert parsed.tool_call_id == sent.get("tool_call_id")
        tool_calls = sent.get("tool_calls")
        assert parsed.tool_calls == (None if tool_calls is None else tuple(tool_calls))
        content = sent["content"]
        if isinstance(content, list):
            assert isinstance(parsed.content, tuple)
            for part, sent_part in zip(parsed.content, content, strict=True):
                if sent_part["type"] == "text":
                    assert part == TextPart(text=sent_part["text"])
                else:
                    assert part == ImagePart(url=_image_url(sent_part))
        else:
            assert parsed.content == content


@given(st.sampled_from(COMMANDS), REQUEST_IDS)
@settings(max_examples=50, deadline=None)
def test_every_command_keeps_its_id(cmd: str, rid: str | int) -> None:
    bases: dict[str, dict[str, Any]] = {
        "load": {"path": "/m"},
        "generate": {"prompt": ""},
        "chat": {"messages": [{"role": "user", "content": ""}]},
        "tokenize": {"text": ""},
        "detokenize": {"tokens": []},
        "inspect": {"prompt": ""},
    }
    base = bases.get(cmd, {})
    request = decode_request(_line({"cmd": cmd, "id": rid, **base}))
    assert request.id == rid


def test_null_is_the_same_as_absent() -> None:
    options = {name: None for name in SAMPLING_OPTIONS}
    request = decode_request(_line({"cmd": "generate", "prompt": "x", "id": None, **options}))
    assert request == Generate(prompt="x")


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("top_p", 0, 1.0),
        ("top_p", 0.0, 1.0),
        ("repetition_penalty", 0, None),
        ("max_tokens", 5.0, 5),
        ("stop", [], ()),
        ("logit_bias", {}, ()),
    ],
)
def test_documented_defaults(field: str, value: object, expected: object) -> None:
    request = decode_request(_line({"cmd": "generate", "prompt": "x", field: value}))
    assert isinstance(request, Generate)
    assert getattr(request.sampling, field) == expected


def test_repeat_penalty_is_an_alias() -> None:
    def penalty(**fields: Any) -> float | None:
        request = decode_request(_line({"cmd": "generate", "prompt": "x", **fields}))
        assert isinstance(request, Generate)
        return request.sampling.repetition_penalty

    assert penalty(repeat_penalty=1.1) == 1.1
    assert penalty(repetition_penalty=1.3, repeat_penalty=1.1) == 1.3
    assert penalty(repetition_penalty=0, repeat_penalty=1.1) == 1.1


# -- bad fields are named ------------------------------------------------------------------

NOT_A_NUMBER: st.SearchStrategy[object] = (
    st.text(max_size=5) | st.booleans() | st.lists(st.integers(), max_size=2) | st.just({})
)
NOT_AN_INTEGER: st.SearchStrategy[object] = NOT_A_NUMBER | FINITE.filter(
    lambda f: not f.is_integer()
)
NOT_A_STRING: st.SearchStrategy[object] = (
    st.booleans() | WIRE_INTS | FINITE | st.lists(st.text(), max_size=2) | st.just({})
)
NOT_A_BOOL: st.SearchStrategy[object] = (
    WIRE_INTS | FINITE | st.text(max_size=5) | st.lists(st.booleans(), max_size=2)
)
NOT_AN_OBJECT: st.SearchStrategy[object] = (
    WIRE_INTS | st.text(max_size=5) | st.booleans() | st.lists(st.integers(), max_size=2)
)

GENERATE = {"cmd": "generate", "prompt": "x"}
CHAT = {"cmd": "chat", "messages": [{"role": "user", "content": "x"}]}
LOAD = {"cmd": "load", "path": "/m"}

WRONG_TYPE_CASES: list[tuple[dict[str, Any], str, st.SearchStrategy[Any]]] = [
    (GENERATE, "max_tokens", NOT_AN_INTEGER),
    (GENERATE, "temperature", NOT_A_NUMBER),
    (GENERATE, "top_p", NOT_A_NUMBER),
    (GENERATE, "top_k", NOT_AN_INTEGER),
    (GENERATE, "min_p", NOT_A_NUMBER),
    (GENERATE, "repetition_penalty", NOT_A_NUMBER),
    (GENERATE, "repeat_penalty", NOT_A_NUMBER),
    (GENERATE, "repetition_context_size", NOT_AN_INTEGER),
    (GENERATE, "seed", NOT_AN_INTEGER),
    (GENERATE, "logprobs", NOT_AN_INTEGER),
    (GENERATE, "logit_bias", NOT_AN_OBJECT),
    (GENERATE, "stop", WIRE_INTS | FINITE | st.booleans() | st.just({})),
    (GENERATE, "prompt", NOT_A_STRING),
    (CHAT, "temperature", NOT_A_NUMBER),
    (CHAT, "messages", NOT_A_STRING.filter(lambda v: not isinstance(v, list))),
    (CHAT, "chat_template_kwargs", NOT_AN_OBJECT),
    (LOAD, "path", NOT_A_STRING),
    (LOAD, "adapter_path", NOT_A_STRING),
    (LOAD, "context_len", NOT_AN_INTEGER),
    (LOAD, "gpu_layers", NOT_AN_INTEGER),
    (LOAD, "parallel_slots", NOT_AN_INTEGER),
    (LOAD, "trust_remote_code", NOT_A_BOOL),
    (LOAD, "force", NOT_A_BOOL),
    ({"cmd": "tokenize", "text": "x"}, "text", NOT_A_STRING),
    ({"cmd": "tokenize", "text": "x"}, "add_special_tokens", NOT_A_BOOL),
    (
        {"cmd": "detokenize", "tokens": []},
        "tokens",
        WIRE_INTS | FINITE | st.text(max_size=5) | st.booleans() | st.just({}),
    ),
    ({"cmd": "ping"}, "cmd", NOT_A_STRING),
]


@pytest.mark.parametrize(
    ("base", "field", "values"),
    WRONG_TYPE_CASES,
    ids=[f"{base['cmd']}.{field}" for base, field, _ in WRONG_TYPE_CASES],
)
@settings(max_examples=20, deadline=None)
@given(data=st.data(), rid=REQUEST_IDS)
def test_wrong_types_name_the_field(
    base: dict[str, Any],
    field: str,
    values: st.SearchStrategy[Any],
    data: st.DataObject,
    rid: str | int,
) -> None:
    value = data.draw(values)
    with pytest.raises(InvalidRequest) as info:
        decode_request(_line({**base, field: value, "id": rid}))
    assert info.value.message.startswith(f"{field}: "), info.value.message
    assert info.value.request_id == rid


NESTED_CASES: list[tuple[dict[str, Any], str]] = [
    ({**CHAT, "messages": [{"role": "user", "content": 5}]}, "messages[0].content: "),
    ({**CHAT, "messages": [{"role": "user", "content": "x"}, {"role": 5}]}, "messages[1].role: "),
    ({**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role: "),
    ({**CHAT, "messages": [{"role": "user"}]}, "messages[0].content: required"),
    ({**CHAT, "messages": [{"role": "tool", "content": None}]}, "messages[0].content: required"),
    ({**CHAT, "messages": [{"role": "assistant", "tool_calls": []}]}, "messages[0].content: "),
    ({**CHAT, "messages": [{"content": "x"}]}, "messages[0].role: "),
    ({**CHAT, "messages": [{"role": ""}]}, "messages[0].role: "),
    ({**CHAT, "messages": [{"role": "user", "name": 1}]}, "messages[0].name: "),
    ({**CHAT, "messages": [{"role": "user", "tool_calls": {}}]}, "messages[0].tool_calls: "),
    ({**CHAT, "messages": [{"role": "tool", "tool_call_id": 1}]}, "messages[0].tool_call_id: "),
    ({**CHAT, "messages": ["hi"]}, "messages[0]: "),
    ({**CHAT, "messages": []}, "messages: "),
    ({"cmd": "chat"}, "messages: "),
    (
        {**CHAT, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
        "messages[0].content[0].text: ",
    ),
    (
        {**CHAT, "messages": [{"role": "user", "content": [{"type": "audio"}]}]},
        "messages[0].content[0].type: ",
    ),
    (
        {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        "messages[0].content[0].image_url: ",
    ),
    (
        {
            **CHAT,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
        },
        "messages[0].content[0].image_url.url: ",
    ),
    ({**CHAT, "messages": [{"role": "user", "content": [3]}]}, "messages[0].content[0]: "),
    ({**GENERATE, "stop": ["a", 1]}, "stop[1]: "),
    ({**GENERATE, "stop": ""}, "stop[0]: "),
    ({**GENERATE, "logit_bias": {"abc": 1}}, "logit_bias['abc']: "),
    ({**GENERATE, "logit_bias": {"-3": 1}}, "logit_bias['-3']: "),
    ({**GENERATE, "logit_bias": {"5": "x"}}, "logit_bias['5']: "),
    ({"cmd": "detokenize", "tokens": [1, "2"]}, "tokens[1]: "),
    ({"cmd": "detokenize", "tokens": [-1]}, "tokens[0]: "),
    ({"cmd": "generate"}, "prompt: "),
    ({"cmd": "load"}, "path: "),
    ({"cmd": "load", "path": ""}, "path: "),
    ({"cmd": "tokenize"}, "text: "),
    ({"cmd": "detokenize"}, "tokens: "),
    ({"id": 1}, "cmd: "),
]


@pytest.mark.parametrize(("raw", "prefix"), NESTED_CASES, ids=[p for _, p in NESTED_CASES])
def test_nested_errors_name_the_path(raw: dict[str, Any], prefix: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        decode_request(_line({**raw, "id": "n1"}))
    assert info.value.message.startswith(prefix), info.value.message
    assert info.value.request_id == "n1"


# -- ids in errors ------------------------------------------------------------------------


@FAST
@given(REQUEST_IDS, st.sampled_from(["temperature", "max_tokens", "stop", "prompt"]))
def test_readable_ids_are_echoed_in_errors(rid: str | int, field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        decode_request(_line({"cmd": "generate", "prompt": "x", field: {}, "id": rid}))
    assert info.value.request_id == rid
    assert ErrorReply.of(info.value).to_wire()["id"] == rid


@FAST
@given(REQUEST_IDS, st.text(max_size=10).filter(lambda c: c not in COMMANDS))
def test_unknown_commands_echo_the_id(rid: str | int, cmd: str) -> None:
    with pytest.raises(UnknownCommand) as info:
        decode_request(_line({"cmd": cmd, "id": rid}))
    assert info.value.request_id == rid


@FAST
@given(
    st.booleans() | FINITE | st.lists(st.integers(), max_size=2) | st.just({"a": 1}),
    st.sampled_from(COMMANDS),
)
def test_unreadable_ids_are_not_echoed(rid: object, cmd: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        decode_request(_line({"cmd": cmd, "id": rid}))
    assert info.value.message.startswith("id: must be a string or an integer")
    assert info.value.request_id is None
    assert "id" not in ErrorReply.of(info.value).to_wire()


# -- integers -----------------------------------------------------------------------------

INT_FIELDS: list[tuple[dict[str, Any], str]] = [
    (GENERATE, "max_tokens"),
    (GENERATE, "top_k"),
    (GENERATE, "repetition_context_size"),
    (GENERATE, "seed"),
    (GENERATE, "logprobs"),
    (CHAT, "max_tokens"),
    (LOAD, "context_len"),
    (LOAD, "gpu_layers"),
    (LOAD, "parallel_slots"),
    ({"cmd": "ping"}, "id"),
]
NUMBER_FIELDS = ["temperature", "top_p", "min_p", "repetition_penalty", "repeat_penalty"]


@pytest.mark.parametrize(("base", "field"), INT_FIELDS, ids=[f for _, f in INT_FIELDS])
@pytest.mark.parametrize("flag", [True, False])
def test_bool_is_never_an_integer(base: dict[str, Any], field: str, flag: bool) -> None:
    with pytest.raises(InvalidRequest) as info:
        decode_request(_line({**base, field: flag}))
    assert info.value.message.startswith(f"{field}: ")
    assert "boolean" in info.value.message


@pytest.mark.parametrize("field", NUMBER_FIELDS)
@pytest.mark.parametrize("flag", [True, False])
def test_bool_is_never_a_number(field: str, flag: bool) -> None:
    with pytest.raises(InvalidRequest, match=rf"^{field}: must be a number, got a boolean$"):
        decode_request(_line({**GENERATE, field: flag}))


@pytest.mark.parametrize("flag", [True, False])
def test_bool_is_never_a_token_id(flag: bool) -> None:
    with pytest.raises(InvalidRequest, match=r"^tokens\[1\]: must be an integer, got a boolean$"):
        decode_request(_line({"cmd": "detokenize", "tokens": [1, flag]}))


@FAST
@given(st.integers(max_value=0), st.sampled_from(["generate", "chat"]))
def test_max_tokens_below_one_is_rejected(value: int, cmd: str) -> None:
    base = GENERATE if cmd == "generate" else CHAT
    with pytest.raises(InvalidRequest, match=r"^max_tokens: must be an integer ≥ 1$"):
        decode_request(_line({**base, "max_tokens": value}))


@FAST
@given(
    st.sampled_from(
        [
            ("temperature", -1e-9, None),
            ("top_p", -0.1, 1.0),
            ("min_p", -0.1, 1.0),
            ("repetition_penalty", -0.1, None),
            ("logprobs", -1, MAX_LOGPROBS),
            ("top_k", -1, None),
            ("seed", -1, None),
            ("repetition_context_size", 0, None),
        ]
    ),
    st.floats(min_value=1e-6, max_value=1e6),
)
def test_out_of_range_values_are_rejected(
    case: tuple[str, float, float | None], excess: float
) -> None:
    field, low, high = case
    too_low: float = low - excess
    if field in ("logprobs", "top_k", "seed", "repetition_context_size"):
        too_low = math.floor(too_low)
    values = [too_low] + ([high + max(excess, 1)] if high is not None else [])
    for value in values:
        with pytest.raises(InvalidRequest) as info:
            decode_request(_line({**GENERATE, field: value}))
        assert info.value.message.startswith(f"{field}: must be ")


@pytest.mark.parametrize("literal", [b"1e999", b"-1e999", b"Infinity", b"NaN"])
def test_non_finite_numbers_never_reach_the_parser(literal: bytes) -> None:
    with pytest.raises(InvalidJson, match="^line is not valid JSON: "):
        decode_request(b'{"cmd":"generate","prompt":"x","temperature":' + literal + b"}")


def test_decode_json_is_strict_about_utf8() -> None:
    with pytest.raises(InvalidJson, match=r"^line is not valid UTF-8 \(byte 0xc3 at offset 1\)$"):
        decode_json(b'"\xc3("')
