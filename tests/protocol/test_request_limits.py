"""The edge's limits (issue 9, items 5, 6, 7, 14): bounded integers, bounded
nesting, NUL-free paths, integer token ids, chat roles and content, and the
one list of known fields, which the parsers must read exactly."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.codec import decode_request, decode_request_checked
from protocol.errors import InvalidJson, InvalidRequest, UnknownCommand
from protocol.fields import MAX_INT32, MAX_JSON_DEPTH, text_too_deep, too_deep
from protocol.requests import (
    CONTENT_PART_FIELDS,
    IMAGE_URL_FIELDS,
    MESSAGE_FIELDS,
    REQUEST_FIELDS,
    ROLES,
    SAMPLING_OPTIONS,
    Chat,
    Detokenize,
    Load,
    field_list,
    parse_request,
    parse_request_checked,
)


def _line(obj: object) -> bytes:
    return orjson.dumps(obj)


def _error(raw: dict[str, Any], *, strict: bool = False) -> str:
    with pytest.raises(InvalidRequest) as info:
        parse_request(raw, strict=strict)
    return info.value.message


CHAT = {"cmd": "chat", "messages": [{"role": "user", "content": "hi"}]}

# -- integers --------------------------------------------------------------------------------

INT_FIELDS: list[tuple[dict[str, Any], str]] = [
    *(({"cmd": "generate", "prompt": "x"}, f) for f in ("max_tokens", "top_k")),
    ({"cmd": "generate", "prompt": "x"}, "repetition_context_size"),
    ({"cmd": "generate", "prompt": "x"}, "logprobs"),
    ({"cmd": "generate", "prompt": "x"}, "seed"),
    *((CHAT, f) for f in ("max_tokens", "top_k", "repetition_context_size")),
    *(({"cmd": "load", "path": "/m"}, f) for f in ("context_len", "gpu_layers", "parallel_slots")),
]


@pytest.mark.parametrize(("base", "field"), INT_FIELDS, ids=lambda v: str(v))
@pytest.mark.parametrize("value", [2**64 - 1, 2**63, -(2**63), 1e20, -1e20, 1e30, 2**31 * 2**33])
def test_every_integer_field_is_bounded(base: dict[str, Any], field: str, value: object) -> None:
    if field == "seed" and isinstance(value, int) and 0 <= value < 2**64:
        return  # seed's range is 0 … 2^64 - 1
    message = _error({**base, field: value, "id": 1})
    assert message.startswith(f"{field}: must be an integer"), message


@pytest.mark.parametrize(("base", "field"), INT_FIELDS, ids=lambda v: str(v))
def test_bounds_are_inclusive_and_written_exactly(base: dict[str, Any], field: str) -> None:
    high = {"logprobs": 20, "seed": 2**64 - 1}.get(field, MAX_INT32)
    parse_request({**base, field: high})
    message = _error({**base, field: high + 1})
    assert str(high) in message and "e+" not in message, message


def test_context_len_1e20_is_invalid_request() -> None:
    with pytest.raises(InvalidRequest) as info:
        decode_request(b'{"cmd":"load","id":1,"path":"/m","context_len":1e20}')
    assert info.value.message == f"context_len: must be an integer ≤ {MAX_INT32}"
    assert info.value.request_id == 1


def test_go_mlx_gpu_layers_still_reads() -> None:
    request = parse_request({"cmd": "load", "path": "/m", "gpu_layers": -1, "parallel_slots": 4})
    assert isinstance(request, Load) and request.gpu_layers == -1


@pytest.mark.parametrize("key", ["9" * 5000, "2147483648", "99999999999", "0" * 11])
def test_logit_bias_keys_are_bounded(key: str) -> None:
    message = _error({"cmd": "generate", "prompt": "x", "logit_bias": {key: 1}})
    assert message.startswith("logit_bias[") and "keys must be token ids" in message


def test_logit_bias_key_at_the_bound() -> None:
    parse_request({"cmd": "generate", "prompt": "x", "logit_bias": {str(MAX_INT32): 1}})


# -- token ids: integers only (item 7) --------------------------------------------------------


@pytest.mark.parametrize("tokens", [[5.0], [1, 2.0], [0.0], [1e3]])
def test_token_ids_written_as_floats_are_refused(tokens: list[object]) -> None:
    with pytest.raises(InvalidRequest, match=r"^tokens\[\d\]: must be an integer, got a number$"):
        decode_request(_line({"cmd": "detokenize", "tokens": tokens}))


@pytest.mark.parametrize("bad", [2**31, 2**63, 2**64 - 1])
def test_token_ids_are_bounded(bad: int) -> None:
    message = _error({"cmd": "detokenize", "tokens": [1, bad]})
    assert message == f"tokens[1]: must be an integer from 0 to {MAX_INT32}"


def test_scalar_integers_still_read_integral_floats() -> None:
    """JSON Schema's "integer" accepts 5.0, and so do scalar fields."""
    request = parse_request({"cmd": "generate", "prompt": "x", "max_tokens": 5.0})
    assert request.sampling.max_tokens == 5  # type: ignore[union-attr]
    assert parse_request({"cmd": "detokenize", "tokens": [5]}) == Detokenize(tokens=(5,))


# -- nesting -----------------------------------------------------------------------------------


def nested(depth: int, leaf: object = 1) -> object:
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


@pytest.mark.parametrize(
    ("field", "make"),
    [
        ("chat_template_kwargs", lambda v: {"chat_template_kwargs": {"a": v}}),
        ("tools", lambda v: {"tools": [{"function": {"name": "f", "parameters": v}}]}),
        ("mock", lambda v: {"mock": {"a": v}}),
        ("logit_bias", lambda v: {"logit_bias": {"1": v}}),
        (
            "messages",
            lambda v: {
                "messages": [{"role": "assistant", "tool_calls": [{"function": {"arguments": v}}]}]
            },
        ),
    ],
)
def test_nesting_is_bounded_and_the_field_named(field: str, make: Any) -> None:
    deep = {**CHAT, **make(nested(MAX_JSON_DEPTH)), "id": "d"}
    with pytest.raises(InvalidRequest) as info:
        decode_request(_line(deep))
    assert info.value.message.startswith(f"{field}"), info.value.message
    assert info.value.message.endswith(f": nested deeper than {MAX_JSON_DEPTH} levels")
    assert info.value.request_id == "d"


def test_nesting_at_the_limit_passes() -> None:
    # the request is level 1, chat_template_kwargs level 2, its value level 3
    raw = {**CHAT, "chat_template_kwargs": {"a": nested(MAX_JSON_DEPTH - 2)}}
    assert too_deep(raw) is None
    assert isinstance(parse_request(raw), Chat)
    raw = {**CHAT, "chat_template_kwargs": {"a": nested(MAX_JSON_DEPTH - 1)}}
    assert too_deep(raw) is not None


def test_orjson_refuses_what_is_deeper_still() -> None:
    with pytest.raises(InvalidJson):
        decode_request(b'{"cmd":"chat","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}")


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 100_000])
def test_tool_call_arguments_text_nested_deep_is_refused(depth: int) -> None:
    arguments = "[" * depth + "]" * depth
    raw = {
        **CHAT,
        "messages": [
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "tool_calls": [{"function": {"name": "f", "arguments": arguments}}],
            },
        ],
    }
    message = _error(raw)
    assert message == (
        f"messages[1].tool_calls[0].function.arguments: nested deeper than {MAX_JSON_DEPTH} levels"
    )


def test_text_depth_ignores_brackets_inside_strings() -> None:
    assert not text_too_deep('{"a": "' + "[" * 1000 + '"}')
    assert not text_too_deep('{"a": "\\"' + "[" * 1000 + '"}')
    assert not text_too_deep("not json at all")
    assert text_too_deep("[" * (MAX_JSON_DEPTH + 1))
    assert not text_too_deep("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH * 2 + "[")


# -- paths -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"cmd": "load", "path": "/a\0b"}, "path"),
        ({"cmd": "load", "path": "/m", "adapter_path": "\0"}, "adapter_path"),
        ({"cmd": "inspect", "prompt": "x", "dir": "/tmp/a\0"}, "dir"),
        (
            {
                "cmd": "chat",
                "messages": [{"role": "user", "content": [{"type": "image", "image": "/a\0"}]}],
            },
            "messages[0].content[0].image",
        ),
        (
            {
                "cmd": "chat",
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "\0"}}]}
                ],
            },
            "messages[0].content[0].image_url.url",
        ),
    ],
)
def test_nul_in_a_path_is_refused_naming_the_field(raw: dict[str, Any], field: str) -> None:
    assert _error(raw) == f"{field}: must not contain a NUL character"


# -- chat messages -----------------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_known_roles(role: str) -> None:
    assert isinstance(
        parse_request({"cmd": "chat", "messages": [{"role": role, "content": "x"}]}), Chat
    )


@pytest.mark.parametrize("role", ["wizard", "User", "function", "ipython", " user"])
def test_unknown_roles_are_refused(role: str) -> None:
    message = _error({"cmd": "chat", "messages": [{"role": role, "content": "x"}]})
    assert message.startswith("messages[0].role: must be one of system, developer, user")


@pytest.mark.parametrize(
    ("message", "ok"),
    [
        ({"role": "user"}, False),
        ({"role": "user", "content": None}, False),
        ({"role": "system", "content": ""}, True),
        ({"role": "tool", "tool_call_id": "c1"}, False),
        ({"role": "tool", "tool_call_id": "c1", "content": "sunny"}, True),
        ({"role": "assistant"}, False),
        ({"role": "assistant", "tool_calls": []}, False),
        ({"role": "assistant", "tool_calls": [{"id": "c1"}]}, True),
        ({"role": "user", "tool_calls": [{"id": "c1"}]}, False),
    ],
)
def test_content_is_required_but_for_an_assistant_calling_tools(
    message: dict[str, Any], ok: bool
) -> None:
    raw = {"cmd": "chat", "messages": [message]}
    if ok:
        parse_request(raw)
    else:
        assert _error(raw).startswith("messages[0].content: required")


# -- unknown fields (item 14) ------------------------------------------------------------------


def test_unknown_fields_are_named_in_order_and_nested() -> None:
    raw = {
        "cmd": "chat",
        "id": 1,
        "max_token": 4,
        "messages": [
            {"role": "user", "content": "x", "contnet": "y"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "a", "cache_control": {}},
                    {"type": "image_url", "image_url": {"url": "data:,", "detail": "low", "w": 1}},
                ],
            },
        ],
        "tools": [{"function": {"name": "f", "strict": True}, "anything": 1}],
        "chat_template_kwargs": {"free": 1},
        "zzz": None,
    }
    request, unknown = decode_request_checked(_line(raw))
    assert isinstance(request, Chat)
    assert unknown == (
        "max_token",
        "zzz",
        "messages[0].contnet",
        "messages[1].content[0].cache_control",
        "messages[1].content[1].image_url.w",
    )


def test_strict_refuses_the_first_unknown_field_and_suggests_the_known_one() -> None:
    raw = {"cmd": "generate", "id": "s", "prompt": "x", "max_token": 4}
    parse_request(raw)  # not strict: ignored
    with pytest.raises(InvalidRequest) as info:
        decode_request(_line(raw), strict=True)
    assert info.value.request_id == "s"
    assert info.value.message == (
        "max_token: unknown field (did you mean 'max_tokens'?) "
        "(refused: the worker runs with --strict)"
    )
    message = _error({**CHAT, "messages": [{"role": "user", "content": "x", "x": 1}]}, strict=True)
    assert message.startswith("messages[0].x: unknown field (refused")


def test_strict_accepts_every_known_field_and_go_mlx_lines() -> None:
    for line in (
        {"cmd": "load", "gpu_layers": -1, "path": "/m", "context_len": 8, "parallel_slots": 1},
        {"cmd": "generate", "prompt": "x", "max_tokens": 256, "repeat_penalty": 1.1, "top_k": 4},
        {"cmd": "cancel"},
        {"cmd": "quit"},
    ):
        assert parse_request_checked(line, strict=True)[1] == ()


class Recording(dict[str, Any]):
    """A request object that records which keys the parser reads."""

    def __init__(self, *args: Any, seen: set[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen = seen

    def get(self, key: str, default: Any = None) -> Any:
        self.seen.add(key)
        return super().get(key, default)


FULL: dict[str, dict[str, Any]] = {
    "load": {
        "path": "/m",
        "adapter_path": "/a",
        "draft_path": "/d",
        "context_len": 8,
        "trust_remote_code": False,
        "force": False,
        "gpu_layers": -1,
        "parallel_slots": 1,
        "progress": True,
        "mock": {},
    },
    "generate": {
        "prompt": "x",
        **{option: None for option in SAMPLING_OPTIONS},
        "cache_key": "k",
        "progress": True,
        "response_format": {"type": "text"},
        "grammar": None,
        "mock": {},
    },
    "tokenize": {"text": "x", "add_special_tokens": True},
    "detokenize": {"tokens": [1]},
    "inspect": {"prompt": "x", "dir": "/tmp/x"},
}
FULL["chat"] = {
    **{k: v for k, v in FULL["generate"].items() if k != "prompt"},
    "messages": [],
    "chat_template_kwargs": {},
    "tools": [],
    "tool_choice": "auto",
}


@pytest.mark.parametrize("cmd", sorted(REQUEST_FIELDS))
def test_the_known_fields_are_exactly_what_the_parsers_read(cmd: str) -> None:
    seen: set[str] = set()
    message_seen: set[str] = set()
    fields = {"cmd": cmd, "id": 1, **FULL.get(cmd, {})}
    if cmd == "chat":
        fields["messages"] = [
            Recording(
                {
                    "role": "assistant",
                    "content": [{"type": "text", "text": "x"}],
                    "name": "n",
                    "tool_calls": [{"id": "c"}],
                    "tool_call_id": "c",
                },
                seen=message_seen,
            )
        ]
    assert set(fields) == REQUEST_FIELDS[cmd]
    parse_request(Recording(fields, seen=seen))
    assert seen == REQUEST_FIELDS[cmd]
    if cmd == "chat":
        assert message_seen == MESSAGE_FIELDS


def test_the_content_part_fields_are_what_the_parser_reads() -> None:
    part_seen: set[str] = set()
    url_seen: set[str] = set()
    parts = [
        Recording({"type": "text", "text": "x"}, seen=part_seen),
        Recording({"type": "image", "image": "/i.png"}, seen=part_seen),
        Recording(
            {"type": "image_url", "image_url": Recording({"url": "/i.png"}, seen=url_seen)},
            seen=part_seen,
        ),
    ]
    parse_request({"cmd": "chat", "messages": [{"role": "user", "content": parts}]})
    assert part_seen == CONTENT_PART_FIELDS
    assert url_seen | {"detail"} == IMAGE_URL_FIELDS  # detail: OpenAI's, accepted, unused


# -- any value in any field: a typed error or a request, nothing else --------------------------

HOSTILE_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(["\0", "NaN", "~nosuchuser/x", "-1", "[" * 80, "9" * 5000])
)
HOSTILE_VALUES = st.recursive(
    HOSTILE_SCALARS,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)
VALID: dict[str, dict[str, Any]] = {
    "load": {"path": "/m"},
    "generate": {"prompt": "x"},
    "chat": {"messages": [{"role": "user", "content": "x"}]},
    "tokenize": {"text": "x"},
    "detokenize": {"tokens": [1]},
    "inspect": {"prompt": "x"},
}
FIELDS_OF_EVERY_COMMAND = [(cmd, f) for cmd in sorted(REQUEST_FIELDS) for f in REQUEST_FIELDS[cmd]]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(FIELDS_OF_EVERY_COMMAND), HOSTILE_VALUES, st.booleans())
def test_any_value_in_any_field_is_a_request_or_a_typed_error(
    cmd_field: tuple[str, str], value: object, strict: bool
) -> None:
    cmd, field = cmd_field
    raw = {"cmd": cmd, **VALID.get(cmd, {}), field: value}
    try:
        request, _ = parse_request_checked(raw, strict=strict)
    except (InvalidRequest, UnknownCommand) as exc:
        assert exc.message.split(":", 1)[0].split("[")[0].split(".")[0] in (field, "id", "cmd")
        return
    # every integer that was accepted fits what JSON and MLX carry
    assert all(-(2**63) <= n < 2**64 for n in _integers(request)), request


def _integers(value: object) -> Iterator[int]:
    """The integers of a parsed request, outside the free-form values
    (``mock``, ``tools``, ``tool_calls``, ``chat_template_kwargs``)."""
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        yield value
    elif isinstance(value, tuple):
        for item in value:
            yield from _integers(item)
    elif dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            if f.name not in ("mock", "tools", "tool_calls", "chat_template_kwargs"):
                yield from _integers(getattr(value, f.name))


def test_reported_field_names_are_bounded() -> None:
    names = [f"k{i}" for i in range(30)] + ["k0", "z" * 1000]
    listed = field_list(names)
    assert listed.startswith("k0, k1, k2,") and listed.endswith("k19 and 11 more")
    assert field_list(["z" * 1000]) == "z" * 80 + "…"
    message = _error({"cmd": "ping", "z" * 1000: 1}, strict=True)
    assert message.startswith("z" * 80 + "…: unknown field (refused")
