"""Tool calls on a vision model, through the text engine's own implementation.

The tools reach the chat template, earlier calls are rendered the same way
(their JSON ``arguments`` text decoded to an object), and the answer is
parsed for calls with mlx-lm's format for the tokenizer, as for a text
model. The fixture is a copy of the tiny vision model with a Qwen-style
tools template; it has no spare token ids to force a call with, so the
parser is checked on a known answer.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.engines.tool_calls import template_fields
from protocol.requests import Chat, Detokenize, Load, parse_request
from tests.bridge.test_tool_calls import HISTORY, QWEN_CALL, TOOLS
from tests.bridge.test_vision import tiny_vlm as tiny_vlm  # the session fixture
from tests.harness import WorkerProcess

TOOLS_TEMPLATE = (
    "{%- if tools -%}{{- '<|im_start|>system\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- tool | tojson -}}{%- endfor -%}"
    "{{- '</tools><|im_end|>\\n' -}}{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- elif message['content'] is not none -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] in ('image', 'image_url') or 'image' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message.tool_calls -%}{%- for tool_call in message.tool_calls -%}"
    "{%- if tool_call.function is defined -%}{%- set tool_call = tool_call.function -%}{%- endif -%}"
    '{{- \'<tool_call>\\n{"name": "\' + tool_call.name + \'", "arguments": \' -}}'
    "{{- tool_call.arguments | tojson -}}{{- '}\\n</tool_call>' -}}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


@pytest.fixture(scope="module")
def tools_vlm(tiny_vlm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vlm-tools") / "vlm"
    shutil.copytree(tiny_vlm, path)
    (path / "chat_template.json").write_text(json.dumps({"chat_template": TOOLS_TEMPLATE}))
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = TOOLS_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def engine(tools_vlm: Path) -> Iterator[Any]:
    from bridge.engines.vision.engine import MlxVlmEngine

    engine = MlxVlmEngine()
    engine.warm_up()
    engine.load(Load(path=str(tools_vlm)))
    yield engine
    engine.unload()  # not close(): that ends this thread's MLX streams, which later tests use


def chat(**fields: Any) -> Chat:
    request = parse_request({"cmd": "chat", "id": 1, **fields})
    assert isinstance(request, Chat)
    return request


def test_a_vision_models_answer_is_parsed_like_a_text_models(engine: Any) -> None:
    """The tiny vision model has no spare token ids to force a call with
    (as the text fixture's end-to-end tests do), so the parser that ``done``
    uses is called with a known answer."""
    prepared = engine.prepare(chat(messages=HISTORY[:1], tools=TOOLS))
    assert prepared.answer_parser is not None
    parsed = prepared.answer_parser(f"Checking.\n{QWEN_CALL}")
    assert parsed is not None and parsed.content == "Checking."
    (call,) = parsed.tool_calls
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}


def test_without_tools_nothing_is_parsed(engine: Any) -> None:
    assert engine.prepare(chat(messages=HISTORY[:1])).answer_parser is None


def test_history_is_rendered_as_the_text_engine_renders_it(engine: Any) -> None:
    """The earlier call's arguments (JSON text on the wire) reach the
    template as an object, through the one shared implementation."""
    request = chat(messages=HISTORY, tools=TOOLS)
    calls = [m for m in request.messages if m.tool_calls]
    fields = template_fields(calls[0])
    assert fields["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    prepared = engine.prepare(request)
    text = engine.detokenize(Detokenize(id=2, tokens=prepared.tokens))
    assert '"arguments": {"city": "Paris"}' in text, text
    assert "<tools>" in text and "get_weather" in text


def test_through_the_worker_the_tools_reach_the_template(tools_vlm: Path) -> None:
    with WorkerProcess("bridge") as worker:
        loaded = worker.call({"cmd": "load", "id": "l", "path": str(tools_vlm)}, timeout=120)
        assert loaded["vision"] is True
        plain = {"cmd": "chat", "messages": HISTORY[:1], "max_tokens": 2}
        without = worker.request({**plain, "id": "a"})[-1]
        with_tools = worker.request({**plain, "id": "b", "tools": TOOLS})[-1]
        assert with_tools["type"] == without["type"] == "done"
        assert with_tools["prompt_tokens"] > without["prompt_tokens"]  # the <tools> block
        assert "knows no tool-call format" not in worker.stderr_text
