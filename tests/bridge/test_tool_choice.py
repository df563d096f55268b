"""``tool_choice``: "auto", "none", "required", or one named function.

``required`` (and a named function) constrain the answer, with the
structured-output machinery, to exactly one call in the model's own
markers, of one of the declared tools, whose arguments validate against
that tool's parameters; ``done`` then carries the parsed call.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from bridge import demo_model
from tests.harness import WorkerProcess

PARAMETERS = {
    "get_weather": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "get_time": {
        "type": "object",
        "properties": {
            "zone": {"enum": ["CET", "UTC"]},
            "hours": {"type": "integer", "maximum": 24},
        },
        "required": ["zone", "hours"],
        "additionalProperties": False,
    },
}
TOOLS = [
    {"type": "function", "function": {"name": name, "parameters": schema}}
    for name, schema in PARAMETERS.items()
]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tools_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_model.ensure(
        tmp_path_factory.mktemp("models") / "qwen-tools", template="qwen_tools"
    )


@pytest.fixture(scope="module")
def worker(tools_model: Path) -> Iterator[WorkerProcess]:
    with WorkerProcess("bridge") as w:
        assert w.call({"cmd": "load", "id": "l", "path": str(tools_model)})["type"] == "loaded"
        yield w


def chat(rid: str, **fields: Any) -> dict[str, Any]:
    return {
        "cmd": "chat",
        "id": rid,
        "messages": MESSAGES,
        "tools": TOOLS,
        "max_tokens": 96,
        **fields,
    }


def test_required_gives_one_valid_call(worker: WorkerProcess) -> None:
    for i, sampling in enumerate(
        ({"temperature": 0.0}, {"temperature": 1.0, "seed": 5}, {"temperature": 1.0, "seed": 9})
    ):
        done = worker.request(chat(f"r{i}", tool_choice="required", **sampling))[-1]
        assert done["finish_reason"] == "stop", done
        (call,) = done["tool_calls"]
        name = call["function"]["name"]
        assert name in PARAMETERS
        jsonschema.validate(json.loads(call["function"]["arguments"]), PARAMETERS[name])


def test_a_named_function_is_the_one_called(worker: WorkerProcess) -> None:
    for name in PARAMETERS:
        choice = {"type": "function", "function": {"name": name}}
        done = worker.request(chat(f"n-{name}", tool_choice=choice))[-1]
        (call,) = done["tool_calls"]
        assert call["function"]["name"] == name
        jsonschema.validate(json.loads(call["function"]["arguments"]), PARAMETERS[name])


def test_none_and_auto(worker: WorkerProcess) -> None:
    none = worker.request(chat("none", tool_choice="none", max_tokens=16))[-1]
    assert none["type"] == "done" and "tool_calls" not in none
    auto = worker.request(chat("auto", max_tokens=16))[-1]
    assert auto["type"] == "done"
    # "none" leaves the tools out of the prompt: fewer prompt tokens than "auto"
    assert none["prompt_tokens"] < auto["prompt_tokens"]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"tool_choice": "always"}, "tool_choice"),
        ({"tool_choice": 3}, "tool_choice"),
        ({"tool_choice": ["required"]}, "tool_choice"),
        ({"tool_choice": {"type": "function"}}, "tool_choice.function"),
        ({"tool_choice": {"type": "tool", "function": {"name": "get_time"}}}, "tool_choice.type"),
        ({"tool_choice": {"function": {"name": "nope"}}}, "tool_choice.function.name"),
        ({"tool_choice": {"function": {"name": ""}}}, "tool_choice.function.name"),
        ({"tool_choice": "required", "tools": None}, "tool_choice"),
        (
            {"tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
        ),
    ],
)
def test_hostile_tool_choice(worker: WorkerProcess, fields: dict[str, Any], field: str) -> None:
    reply = worker.call(chat("h", **fields))
    assert reply["type"] == "error" and reply["code"] == "invalid_request", reply
    assert reply["error"].startswith(field), reply["error"]
    assert worker.call({"cmd": "ping", "id": "p"})["type"] == "pong"


def test_required_needs_a_json_tool_format(tmp_path: Path, tiny_model: Path) -> None:
    pythonic = demo_model.ensure(tmp_path / "pythonic", template="pythonic")
    for path, word in ((pythonic, "pythonic"), (tiny_model, "no tool-call format")):
        with WorkerProcess("bridge") as w:
            assert w.call({"cmd": "load", "id": "l", "path": str(path)})["type"] == "loaded"
            reply = w.call(chat("p", tool_choice="required"))
            assert reply["code"] == "invalid_request" and word in reply["error"], reply
