"""The wire of batching (issue 10): ``progress`` on requests, the ``progress``
event, ``info``'s ``batch``, and ``hello``'s new limits, with hostile values."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.codec import encode
from protocol.errors import InvalidJson, InvalidRequest
from protocol.replies import (
    NON_TERMINAL_TYPES,
    BatchStats,
    HelloReply,
    InfoReply,
    MemoryStats,
    ModelFacts,
    ProgressEvent,
)
from protocol.reply_decode import parse_reply
from protocol.requests import Chat, Generate, Load, parse_request
from tests.schema_check import validate_reply

HUGE = 2**200
NESTED: object = [[[[{"a": [1]}]]]]
HOSTILE: list[object] = [
    HUGE,
    -HUGE,
    -1,
    1.5,
    "x",
    "\0",
    "",
    [],
    {},
    NESTED,
    True,
    False,
    0,
    1,
    None,
]
BASES: dict[str, dict[str, Any]] = {
    "generate": {"cmd": "generate", "prompt": "hi"},
    "chat": {"cmd": "chat", "messages": [{"role": "user", "content": "hi"}]},
    "load": {"cmd": "load", "path": "/models/m"},
}


# -- the request field -------------------------------------------------------------------


@pytest.mark.parametrize("cmd", sorted(BASES))
def test_progress_defaults_to_false_and_reads_true_with_an_id(cmd: str) -> None:
    plain = parse_request({**BASES[cmd], "id": 1})
    asked = parse_request({**BASES[cmd], "id": 1, "progress": True})
    assert isinstance(plain, Generate | Chat | Load) and isinstance(asked, Generate | Chat | Load)
    assert plain.progress is False and asked.progress is True
    assert parse_request({**BASES[cmd], "progress": False}).progress is False  # type: ignore[union-attr]
    assert parse_request({**BASES[cmd], "progress": None}).progress is False  # type: ignore[union-attr]


@pytest.mark.parametrize("cmd", sorted(BASES))
@pytest.mark.parametrize("rid", [None, "absent"])
def test_progress_true_without_an_id_is_refused_naming_the_field(cmd: str, rid: object) -> None:
    raw = {**BASES[cmd], "progress": True}
    if rid is None:
        raw["id"] = None
    with pytest.raises(InvalidRequest, match=r"^progress: needs an id \("):
        parse_request(raw)


@pytest.mark.parametrize("cmd", sorted(BASES))
@pytest.mark.parametrize("value", HOSTILE, ids=repr)
def test_progress_of_any_other_type_is_refused_naming_the_field(cmd: str, value: object) -> None:
    raw = {**BASES[cmd], "id": "r", "progress": value}
    if value is None or isinstance(value, bool):
        parse_request(raw)
        return
    with pytest.raises(InvalidRequest, match="^progress: must be true or false") as info:
        parse_request(raw)
    assert info.value.request_id == "r"


# -- the progress event ----------------------------------------------------------------------

EVENTS = [
    ProgressEvent(id="p", stage="prefill", done=512, total=8000),
    ProgressEvent(id=0, stage="load", step="checking", done=7, total=7, unit="files"),
    ProgressEvent(id=2**63, stage="load", step="weights", done=0, total=2**40, unit="bytes"),
    ProgressEvent(id=-3, stage="load", step="ready"),
]


@pytest.mark.parametrize("event", EVENTS, ids=repr)
def test_progress_event_round_trips_and_validates(event: ProgressEvent) -> None:
    obj = orjson.loads(encode(event))
    validate_reply(obj)
    assert list(obj)[:3] == ["type", "id", "stage"]  # the supervisor attributes by the head
    assert parse_reply(obj) == event


def test_progress_is_not_terminal() -> None:
    assert NON_TERMINAL_TYPES == {"token", "progress"}


def test_progress_event_leaves_unknown_figures_out() -> None:
    obj = ProgressEvent(id=1, stage="load", step="tokenizer").to_wire()
    assert obj == {"type": "progress", "id": 1, "stage": "load", "step": "tokenizer"}


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"type": "progress", "stage": "prefill"}, "progress.id: required"),
        ({"type": "progress", "id": 1}, "progress.stage: required"),
        ({"type": "progress", "id": 1, "stage": ""}, "progress.stage: must not be empty"),
        ({"type": "progress", "id": 1, "stage": 5}, "progress.stage: must be a string"),
        ({"type": "progress", "id": 1, "stage": "prefill", "done": -1}, "progress.done: must be"),
        ({"type": "progress", "id": 1, "stage": "prefill", "total": "9"}, "progress.total: must"),
        ({"type": "progress", "id": 1, "stage": "prefill", "done": 1.5}, "progress.done: must"),
        ({"type": "progress", "id": 1, "stage": "load", "unit": []}, "progress.unit: must"),
        ({"type": "progress", "id": 1, "stage": "load", "step": {}}, "progress.step: must"),
        ({"type": "progress", "id": True, "stage": "load"}, "id: must be a string or an integer"),
    ],
)
def test_a_bad_progress_line_names_the_field(obj: object, message: str) -> None:
    with pytest.raises(InvalidRequest, match=f"^{message}"):
        parse_reply(obj)


PROGRESS_FIELDS = ["id", "stage", "step", "done", "total", "unit"]
ANY_VALUE = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.sampled_from(["\0", "prefill", "load", "9" * 500]),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=6,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(PROGRESS_FIELDS), ANY_VALUE)
def test_any_value_in_a_progress_field_decodes_or_names_it(field: str, value: object) -> None:
    obj = {"type": "progress", "id": 1, "stage": "prefill", field: value}
    try:
        event = parse_reply(obj)
    except InvalidRequest as exc:
        assert exc.message.startswith((f"progress.{field}:", "id:", "progress.id:")), exc.message
        return
    assert isinstance(event, ProgressEvent)
    for n in (event.done, event.total):
        assert n is None or n >= 0


def test_progress_of_a_non_object_is_invalid_json() -> None:
    with pytest.raises(InvalidJson):
        parse_reply(["progress"])


# -- info.batch -----------------------------------------------------------------------------

FACTS = ModelFacts(
    path="/m",
    model_type="qwen3",
    vocab_size=10,
    layers=2,
    hidden_size=8,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=4,
    context_len=None,
    dtype="float32",
    quantization=None,
    parameters=100,
)
MEMORY = MemoryStats(active_bytes=1, peak_bytes=2, cache_bytes=3, rss_bytes=4)
BATCH = BatchStats(
    running=3,
    prefilling=1,
    queued=2,
    max_concurrency=32,
    kv_reserved_bytes=2**40,
    kv_budget_bytes=None,
    steps=10,
    last_step_ms=4.25,
    tokens_per_s=711.5,
)


@pytest.mark.parametrize("budget", [None, 0, 2**41])
def test_info_batch_round_trips_and_validates(budget: int | None) -> None:
    batch = BatchStats(**{**_fields(BATCH), "kv_budget_bytes": budget})
    info = InfoReply(id=1, model=FACTS, memory=MEMORY, batch=batch)
    obj = orjson.loads(encode(info))
    validate_reply(obj)
    assert obj["batch"]["kv_budget_bytes"] == budget
    assert parse_reply(obj) == info


def test_info_without_batch_leaves_it_out() -> None:
    info = InfoReply(id=1, model=FACTS, memory=MEMORY)
    assert "batch" not in info.to_wire()
    assert parse_reply(info.to_wire()) == info


@pytest.mark.parametrize("field", sorted(_f for _f in BatchStats.__slots__))
@pytest.mark.parametrize("value", HOSTILE, ids=repr)
def test_a_hostile_batch_figure_decodes_or_names_it(field: str, value: object) -> None:
    obj = InfoReply(id=1, model=FACTS, memory=MEMORY, batch=BATCH).to_wire()
    batch = obj["batch"]
    assert isinstance(batch, dict)
    batch[field] = value  # type: ignore[assignment]
    try:
        info = parse_reply(obj)
    except InvalidRequest as exc:
        assert exc.message.startswith(f"info.batch.{field}:"), exc.message
        return
    assert isinstance(info, InfoReply) and info.batch is not None
    got = getattr(info.batch, field)
    assert got is None or got >= 0


def test_a_batch_that_is_not_an_object_is_named() -> None:
    obj = InfoReply(id=1, model=FACTS, memory=MEMORY).to_wire() | {"batch": [1]}
    with pytest.raises(InvalidRequest, match="^info.batch: must be an object"):
        parse_reply(obj)


# -- hello limits -------------------------------------------------------------------------------


def test_hello_limits_carry_the_batching_keys() -> None:
    hello = HelloReply(
        id=1,
        protocol_version=1,
        versions={"bridge": "0.1.0"},
        commands=("hello",),
        sampling_options=("max_tokens",),
        limits={
            "max_line_bytes": 100,
            "max_queue": 4,
            "max_logprobs": 20,
            "max_concurrency": 32,
            "prefill_chunk_tokens": 256,
        },
        pid=1,
    )
    obj = orjson.loads(encode(hello))
    validate_reply(obj)
    assert parse_reply(obj) == hello


@pytest.mark.parametrize("key", ["max_concurrency", "prefill_chunk_tokens"])
@pytest.mark.parametrize("value", ["32", 1.5, None, [], {}, True], ids=repr)
def test_a_hello_limit_that_is_not_an_integer_is_named(key: str, value: object) -> None:
    obj = {
        "type": "hello",
        "id": 1,
        "protocol_version": 1,
        "versions": {},
        "commands": [],
        "sampling_options": [],
        "limits": {key: value},
        "pid": 1,
    }
    with pytest.raises(InvalidRequest, match=f"^hello.limits.{key}: must be an integer"):
        parse_reply(obj)


def _fields(batch: BatchStats) -> dict[str, Any]:
    return {name: getattr(batch, name) for name in BatchStats.__slots__}
