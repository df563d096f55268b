"""Tool calls: tools and tool history through the chat template, calls out of answers.

Two fixture families (``bridge.demo_model`` variants): ``qwen_tools``
(``<tool_call>`` JSON, mlx-lm's ``json_tools`` parser) and ``pythonic``
(``<|tool_call_start|>[f(x=1)]<|tool_call_end|>``, mlx-lm's ``pythonic``
parser). The model's text is random, so known answers go through the real
parser of the real tokenizer; end to end, a copy of the fixture gets added
tokens whose text is a whole tool call, and ``logit_bias`` makes the model
write them.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from bridge import demo_model
from bridge.engines.engine_protocol import Prepared
from bridge.engines.text.engine import MlxLmEngine
from bridge.engines.tool_calls import ToolCallFormat, parse_answer, template_tool_calls
from protocol.codec import decode_request
from protocol.errors import InvalidRequest
from protocol.fields import JsonValue
from protocol.replies import Done, ToolCall
from protocol.requests import Chat, Detokenize, Load
from tests.harness import WorkerProcess, text_of
from tests.schema_check import validate_reply, validate_request

WEATHER: dict[str, JsonValue] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TOOLS: list[Mapping[str, JsonValue]] = [WEATHER]
HISTORY: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Paris and Zürich?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "sunny"},
    {"role": "tool", "tool_call_id": "call_2", "name": "get_weather", "content": "rain"},
]

QWEN_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
QWEN_MALFORMED = '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>'
PYTHONIC_CALL = '<|tool_call_start|>[get_weather(city="Paris")]<|tool_call_end|>'
PYTHONIC_TWO = (
    '<|tool_call_start|>[get_weather(city="Paris"), get_time(zone="CET")]<|tool_call_end|>'
)
PYTHONIC_MALFORMED = "<|tool_call_start|>get the weather, please<|tool_call_end|>"


@pytest.fixture(scope="session")
def qwen_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_model.ensure(tmp_path_factory.mktemp("models") / "qwen", template="qwen_tools")


@pytest.fixture(scope="session")
def pythonic_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_model.ensure(tmp_path_factory.mktemp("models") / "lfm", template="pythonic")


def tokenizer_of(path: Path) -> Any:
    import mlx_lm

    return mlx_lm.load(str(path))[1]


@pytest.fixture(scope="module")
def qwen(qwen_model: Path) -> ToolCallFormat:
    fmt = ToolCallFormat.of(tokenizer_of(qwen_model))
    assert fmt is not None
    return fmt


@pytest.fixture(scope="module")
def pythonic(pythonic_model: Path) -> ToolCallFormat:
    fmt = ToolCallFormat.of(tokenizer_of(pythonic_model))
    assert fmt is not None
    return fmt


# -- the parser mlx-lm picks ------------------------------------------------------------------


def test_mlx_lm_picks_each_familys_parser(
    qwen: ToolCallFormat, pythonic: ToolCallFormat, tiny_model: Path
) -> None:
    assert (qwen.start, qwen.end) == ("<tool_call>", "</tool_call>")
    assert qwen.parser.__module__ == "mlx_lm.tool_parsers.json_tools"
    assert (pythonic.start, pythonic.end) == ("<|tool_call_start|>", "<|tool_call_end|>")
    assert pythonic.parser.__module__ == "mlx_lm.tool_parsers.pythonic"
    assert ToolCallFormat.of(tokenizer_of(tiny_model)) is None  # plain ChatML


# -- answers into calls: Qwen's JSON calls ----------------------------------------------------


def test_qwen_well_formed_call(qwen: ToolCallFormat) -> None:
    parsed = parse_answer(f"Let me check.\n{QWEN_CALL}", qwen, TOOLS)
    assert parsed is not None
    (call,) = parsed.tool_calls
    assert call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_")
    assert parsed.content == "Let me check."


def test_qwen_two_calls(qwen: ToolCallFormat) -> None:
    second = QWEN_CALL.replace("Paris", "Zürich")
    parsed = parse_answer(f"{QWEN_CALL}\n{second}", qwen, TOOLS)
    assert parsed is not None
    assert [json.loads(c.arguments)["city"] for c in parsed.tool_calls] == ["Paris", "Zürich"]
    assert "Zürich" in parsed.tool_calls[1].arguments  # JSON text, not \\u escapes
    assert parsed.tool_calls[0].id != parsed.tool_calls[1].id
    assert parsed.content == ""


def test_qwen_malformed_call_stays_text_with_a_warning(
    qwen: ToolCallFormat, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="bridge.tool_calls"):
        assert parse_answer(f"Sure.\n{QWEN_MALFORMED}", qwen, TOOLS) is None
    assert "malformed tool call kept as text" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bridge.tool_calls"):
        parsed = parse_answer(f"{QWEN_MALFORMED}\n{QWEN_CALL}", qwen, TOOLS)
    assert parsed is not None and len(parsed.tool_calls) == 1
    assert parsed.content == QWEN_MALFORMED  # verbatim, markers included
    assert "malformed tool call" in caplog.text


@pytest.mark.parametrize(
    "body",
    [
        '{"arguments": {"city": "Paris"}}',  # no name
        '["get_weather"]',  # not an object
        '{"name": "", "arguments": {}}',
        "[]",
    ],
)
def test_qwen_calls_without_a_function_name_are_malformed(qwen: ToolCallFormat, body: str) -> None:
    assert parse_answer(f"<tool_call>\n{body}\n</tool_call>", qwen, TOOLS) is None


def test_qwen_no_call(qwen: ToolCallFormat) -> None:
    assert parse_answer("It is sunny in Paris.", qwen, TOOLS) is None
    assert parse_answer("", qwen, TOOLS) is None


def test_qwen_call_cut_before_its_end_marker(qwen: ToolCallFormat) -> None:
    """As in mlx-lm's server, a call runs to the end of the answer without its end marker."""
    complete = parse_answer(QWEN_CALL.removesuffix("\n</tool_call>"), qwen, TOOLS)
    assert complete is not None and complete.tool_calls[0].name == "get_weather"
    assert parse_answer('<tool_call>\n{"name": "get_wea', qwen, TOOLS) is None


def test_arguments_given_as_json_text_and_llama_parameters(qwen: ToolCallFormat) -> None:
    text = (
        '<tool_call>{"name": "a", "arguments": "{\\"x\\": 1}"}</tool_call>'
        '<tool_call>{"name": "b", "parameters": {"y": [1, 2]}}</tool_call>'
        '<tool_call>{"name": "c", "id": "mine"}</tool_call>'
    )
    parsed = parse_answer(text, qwen, TOOLS)
    assert parsed is not None
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [
        ("a", '{"x": 1}'),
        ("b", '{"y": [1, 2]}'),
        ("c", "{}"),
    ]
    assert parsed.tool_calls[2].id == "mine"


# -- answers into calls: the pythonic family --------------------------------------------------


def test_pythonic_well_formed_call(pythonic: ToolCallFormat) -> None:
    parsed = parse_answer(f"{PYTHONIC_CALL} Done.", pythonic, TOOLS)
    assert parsed is not None
    (call,) = parsed.tool_calls
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})
    assert parsed.content == "Done."


def test_pythonic_two_calls(pythonic: ToolCallFormat) -> None:
    parsed = parse_answer(PYTHONIC_TWO, pythonic, TOOLS)
    assert parsed is not None
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"zone": "CET"}),
    ]


def test_pythonic_malformed_call_stays_text_with_a_warning(
    pythonic: ToolCallFormat, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="bridge.tool_calls"):
        assert parse_answer(PYTHONIC_MALFORMED, pythonic, TOOLS) is None
    assert "malformed tool call kept as text" in caplog.text


def test_pythonic_no_call(pythonic: ToolCallFormat) -> None:
    assert parse_answer("get_weather(city='Paris') is what I would call.", pythonic) is None


# -- history into the template ------------------------------------------------------------


def test_template_tool_calls_decodes_json_arguments_without_touching_the_request() -> None:
    calls = HISTORY[1]["tool_calls"]
    assert isinstance(calls, list)
    out = template_tool_calls(calls)
    assert out[0] == {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
    }
    assert calls[0]["function"]["arguments"] == '{"city": "Paris"}'
    odd: list[Any] = [{"function": {"name": "f", "arguments": "not json"}}, "x", {"id": 1}]
    assert template_tool_calls(odd) == odd


@pytest.fixture(scope="module")
def engine() -> Iterator[MlxLmEngine]:
    engine = MlxLmEngine()
    yield engine
    engine.unload()


def rendered(engine: MlxLmEngine, path: Path, request: dict[str, Any]) -> tuple[str, Prepared]:
    engine.load(Load(path=str(path)))
    chat = decode_request(orjson.dumps({"cmd": "chat", "id": "r", **request}))
    assert isinstance(chat, Chat)
    prepared = engine.prepare(chat)
    return engine.detokenize(Detokenize(tokens=prepared.tokens)), prepared


def test_qwen_template_renders_tools_calls_and_results(
    engine: MlxLmEngine, qwen_model: Path
) -> None:
    text, prepared = rendered(engine, qwen_model, {"messages": HISTORY, "tools": TOOLS})
    assert f"<tools>\n{json.dumps(WEATHER, ensure_ascii=False)}\n</tools>" in text
    assert text.endswith(
        "<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>'
        "<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n"
        "<tool_response>\nrain\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert prepared.answer_parser is not None


def test_pythonic_template_renders_tools_calls_and_results(
    engine: MlxLmEngine, pythonic_model: Path
) -> None:
    text, _ = rendered(engine, pythonic_model, {"messages": HISTORY, "tools": TOOLS})
    assert text.startswith("<|im_start|>system\nList of tools: <|tool_list_start|>[{")
    assert text.endswith(
        "<|im_start|>assistant\n"
        '<|tool_call_start|>[get_weather(city="Paris"), get_weather(city="Zürich")]'
        "<|tool_call_end|><|im_end|>\n"
        "<|im_start|>tool\n<|tool_response_start|>sunny<|tool_response_end|><|im_end|>\n"
        "<|im_start|>tool\n<|tool_response_start|>rain<|tool_response_end|><|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_tools_for_a_model_without_a_tool_format(
    engine: MlxLmEngine, tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="bridge.engine"):
        text, prepared = rendered(engine, tiny_model, {"messages": HISTORY[:1], "tools": TOOLS})
    assert prepared.answer_parser is None
    assert "knows no tool-call format" in caplog.text
    assert (
        text == "<|im_start|>user\nWeather in Paris and Zürich?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_without_tools_nothing_is_parsed(engine: MlxLmEngine, qwen_model: Path) -> None:
    _, prepared = rendered(engine, qwen_model, {"messages": HISTORY[:1]})
    assert prepared.answer_parser is None


# -- the wire ---------------------------------------------------------------------------------


def test_done_with_tool_calls_validates() -> None:
    calls = (ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}'),)
    done = Done(
        id="c",
        finish_reason="stop",
        tokens_generated=3,
        prompt_tokens=10,
        prompt_tps=1.0,
        generation_tps=1.0,
        ttft_ms=1.0,
        peak_memory_bytes=1,
        cached_tokens=4,
        tool_calls=calls,
        content="",
    )
    wire = done.to_wire()
    validate_reply(wire)
    assert wire["tool_calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        }
    ]
    assert wire["content"] == "" and wire["cached_tokens"] == 4
    plain = replace(done, tool_calls=None, content=None)
    assert "tool_calls" not in plain.to_wire() and "content" not in plain.to_wire()


@pytest.mark.parametrize(
    ("tools", "message"),
    [
        ({}, "tools: must be a list, got an object"),
        (["x"], "tools[0]: must be an object, got a string"),
        ([{"type": "retrieval"}], "tools[0].type: must be 'function', got 'retrieval'"),
        ([{"type": "function"}], "tools[0].function: required"),
        ([{"function": {}}], "tools[0].function.name: required"),
        ([{"function": {"name": ""}}], "tools[0].function.name: must not be empty"),
        (
            [{"function": {"name": "f", "parameters": []}}],
            "tools[0].function.parameters: must be an object",
        ),
    ],
)
def test_bad_tools_name_the_field(tools: object, message: str) -> None:
    raw = {"cmd": "chat", "id": 1, "messages": [{"role": "user", "content": "x"}], "tools": tools}
    with pytest.raises(InvalidRequest, match=message.replace("[", r"\[").replace("]", r"\]")):
        decode_request(orjson.dumps(raw))
    with pytest.raises(AssertionError):
        validate_request(raw)


@pytest.mark.parametrize(
    "tools",
    [
        None,
        [],
        TOOLS,
        [{"function": {"name": "f"}}],
        [{"type": None, "function": {"name": "f", "parameters": None}}],
    ],
)
def test_good_tools_pass_the_parser_and_the_schema(tools: object) -> None:
    raw = {"cmd": "chat", "messages": [{"role": "user", "content": "x"}], "tools": tools}
    validate_request(raw)
    chat = decode_request(orjson.dumps(raw))
    assert isinstance(chat, Chat)
    assert chat.tools == (tuple(tools) if isinstance(tools, list) else None)


# -- end to end through the worker ------------------------------------------------------------

CANNED = {
    "call": QWEN_CALL,
    "malformed": QWEN_MALFORMED,
}


@pytest.fixture(scope="module")
def canned_model(qwen_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A copy of the qwen fixture whose tokenizer has one added token per canned
    answer (spare ids of the model's padded vocabulary)."""
    from tokenizers import AddedToken, Tokenizer

    path = tmp_path_factory.mktemp("canned") / "qwen"
    shutil.copytree(qwen_model, path)
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.add_tokens([AddedToken(text, normalized=False) for text in CANNED.values()])
    tokenizer.save(str(path / "tokenizer.json"))
    ids = {name: tokenizer.token_to_id(text) for name, text in CANNED.items()}
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    assert all(i < vocab for i in ids.values())
    return {"path": path, "ids": ids}


@pytest.fixture(scope="module")
def tool_worker(canned_model: dict[str, Any]) -> Iterator[WorkerProcess]:
    with WorkerProcess("bridge") as worker:
        load = {"cmd": "load", "id": "l", "path": str(canned_model["path"])}
        assert worker.call(load)["type"] == "loaded"
        yield worker


def forced(
    canned_model: dict[str, Any], name: str, max_tokens: int, **extra: Any
) -> dict[str, Any]:
    return {
        "cmd": "chat",
        "id": name,
        "messages": HISTORY[:1],
        "tools": TOOLS,
        "max_tokens": max_tokens,
        "logit_bias": {str(canned_model["ids"][name]): 1000},
        **extra,
    }


def test_end_to_end_one_call(tool_worker: WorkerProcess, canned_model: dict[str, Any]) -> None:
    lines = tool_worker.request(forced(canned_model, "call", 1))
    assert text_of(lines) == QWEN_CALL  # streamed as an ordinary token
    done = lines[-1]
    assert done["finish_reason"] == "length" and done["content"] == ""
    (call,) = done["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


def test_end_to_end_two_calls(tool_worker: WorkerProcess, canned_model: dict[str, Any]) -> None:
    done = tool_worker.request(forced(canned_model, "call", 2))[-1]
    assert [c["function"]["name"] for c in done["tool_calls"]] == ["get_weather"] * 2
    assert done["tool_calls"][0]["id"] != done["tool_calls"][1]["id"]


def test_end_to_end_malformed_call(
    tool_worker: WorkerProcess, canned_model: dict[str, Any]
) -> None:
    lines = tool_worker.request(forced(canned_model, "malformed", 1))
    assert text_of(lines) == QWEN_MALFORMED
    assert "tool_calls" not in lines[-1] and "content" not in lines[-1]
    deadline = 50
    while "malformed tool call kept as text" not in tool_worker.stderr_text and deadline:
        time.sleep(0.1)
        deadline -= 1
    assert "malformed tool call kept as text" in tool_worker.stderr_text


def test_end_to_end_no_call(tool_worker: WorkerProcess, canned_model: dict[str, Any]) -> None:
    lines = tool_worker.request(
        {"cmd": "chat", "id": "n", "messages": HISTORY, "tools": TOOLS, "max_tokens": 16}
    )
    assert len(lines) == 17 and "tool_calls" not in lines[-1]
    # without tools, a call in the answer is just text
    no_tools = forced(canned_model, "call", 1, tools=None)
    assert "tool_calls" not in tool_worker.request(no_tools)[-1]


def test_end_to_end_legacy_dialect(
    tool_worker: WorkerProcess, canned_model: dict[str, Any]
) -> None:
    request = forced(canned_model, "call", 1)
    del request["id"]
    done = tool_worker.request(request)[-1]
    assert "id" not in done and done["done"] is True
    assert done["tool_calls"][0]["function"]["name"] == "get_weather"
