"""Structured output: ``response_format`` (JSON object, JSON Schema) and ``grammar`` (regex, Lark).

Every answer that ends with ``stop`` parses, and a ``json_schema`` answer
validates against its schema, greedy and sampled, alone and batched with
unconstrained requests; a grammar llguidance cannot compile is
``invalid_request`` naming the field, before any token.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest

from tests.harness import WorkerProcess, text_of, token_ids

SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 10},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "colour": {"enum": ["red", "green", "blue"]},
            "tags": {
                "type": "array",
                "items": {"type": "string", "maxLength": 6},
                "minItems": 1,
                "maxItems": 3,
            },
        },
        "required": ["ok", "colour", "tags"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 0, "maximum": 9999},
                    "email": {"type": "string", "maxLength": 16},
                    "roles": {
                        "type": "array",
                        "items": {"enum": ["admin", "user", "guest"]},
                        "maxItems": 2,
                    },
                },
                "required": ["id", "email", "roles"],
                "additionalProperties": False,
            },
            "score": {"enum": [0, 0.5, 1]},
        },
        "required": ["user", "score"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "integer", "maximum": 999}, "minItems": 2, "maxItems": 4},
    {
        "type": "object",
        "properties": {"when": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}$"}},
        "required": ["when"],
        "additionalProperties": False,
    },
]
PROMPTS = ["Give me JSON:", "The record reads", "{", "Answer in JSON about cats."]


def schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": True}}


def ask(worker: WorkerProcess, rid: str, **fields: Any) -> list[dict[str, Any]]:
    request = {"cmd": "generate", "id": rid, "prompt": PROMPTS[0], "max_tokens": 200, **fields}
    return worker.request(request)


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_every_answer_validates_against_its_schema(
    loaded_worker: WorkerProcess, index: int
) -> None:
    schema = SCHEMAS[index]
    ended = 0
    for p, prompt in enumerate(PROMPTS):
        for sampling in ({"temperature": 0.0}, {"temperature": 1.0, "seed": 7 + p}):
            lines = ask(
                loaded_worker,
                f"s{index}-{p}-{sampling['temperature']}",
                prompt=prompt,
                response_format=schema_format(schema),
                **sampling,
            )
            done = lines[-1]
            assert done["type"] == "done", done
            if done["finish_reason"] == "length":
                continue  # cut off by max_tokens: need not parse (documented)
            assert done["finish_reason"] == "stop"
            answer = json.loads(text_of(lines))
            jsonschema.validate(answer, schema)
            ended += 1
    assert ended >= len(PROMPTS), f"only {ended} of {2 * len(PROMPTS)} answers ended"


def test_json_object_answers_are_objects(loaded_worker: WorkerProcess) -> None:
    """The random fixture rarely closes an object by itself, so one answer
    leans on ``}`` (logit_bias) and must end, parsed; the others start one."""
    (brace,) = loaded_worker.call({"cmd": "tokenize", "id": "t", "text": "}"})["tokens"]
    ended = 0
    for i, prompt in enumerate(PROMPTS):
        bias = {"logit_bias": {str(brace): 1000.0}} if i == 0 else {}
        lines = ask(
            loaded_worker,
            f"jo{i}",
            prompt=prompt,
            response_format={"type": "json_object"},
            temperature=1.0,
            seed=i,
            max_tokens=300,
            **bias,
        )
        text = text_of(lines)
        assert text.startswith("{")
        if lines[-1]["finish_reason"] == "stop":
            assert isinstance(json.loads(text), dict)
            ended += 1
    assert ended >= 1, text


def test_regex_and_lark_grammars(loaded_worker: WorkerProcess) -> None:
    regex = r"[0-9]{4}-(0[1-9]|1[0-2])-[0-3][0-9]"
    for i, prompt in enumerate(PROMPTS):
        lines = ask(
            loaded_worker, f"rx{i}", prompt=prompt, grammar={"type": "regex", "regex": regex}
        )
        assert lines[-1]["finish_reason"] == "stop"
        assert re.fullmatch(regex, text_of(lines)), text_of(lines)
    lark = 'start: "yes" | "no" | "maybe " NUMBER\nNUMBER: /[0-9]{1,3}/'
    for i, prompt in enumerate(PROMPTS):
        lines = ask(loaded_worker, f"lk{i}", prompt=prompt, grammar={"type": "lark", "lark": lark})
        assert lines[-1]["finish_reason"] == "stop"
        assert re.fullmatch(r"yes|no|maybe [0-9]{1,3}", text_of(lines)), text_of(lines)


def test_constrained_and_plain_requests_batch_together(loaded_worker: WorkerProcess) -> None:
    """A constrained row's mask never touches its neighbours: the plain
    requests give what they give alone, and the constrained ones validate."""
    plain: dict[str, dict[str, Any]] = {
        f"p{i}": {"prompt": p, "max_tokens": 24} for i, p in enumerate(PROMPTS[:2])
    }
    alone = {rid: token_ids(ask(loaded_worker, f"alone-{rid}", **f)) for rid, f in plain.items()}
    constrained: dict[str, dict[str, Any]] = {
        f"c{i}": {"prompt": p, "response_format": schema_format(SCHEMAS[i % 2])}
        for i, p in enumerate(PROMPTS)
    }
    for rid, f in {**plain, **constrained}.items():
        loaded_worker.send({"cmd": "generate", "id": rid, "max_tokens": 200, **f})
    got = loaded_worker.collect([*plain, *constrained])
    assert {rid: token_ids(got[rid]) for rid in plain} == alone
    for i, rid in enumerate(constrained):
        if got[rid][-1]["finish_reason"] == "stop":
            jsonschema.validate(json.loads(text_of(got[rid])), SCHEMAS[i % 2])


def test_a_constrained_answer_moves_between_lanes_intact(loaded_worker: WorkerProcess) -> None:
    """Alone it decodes on generate_step; a second request moves it into the
    batch (its cache trimmed, its last token fed again), then back."""
    schema = SCHEMAS[2]
    want = ask(loaded_worker, "solo", response_format=schema_format(schema))
    loaded_worker.send(
        {
            "cmd": "generate",
            "id": "mv",
            "prompt": PROMPTS[0],
            "max_tokens": 200,
            "response_format": schema_format(schema),
        }
    )
    first = loaded_worker.read()
    assert first["type"] == "token"
    loaded_worker.send({"cmd": "generate", "id": "other", "prompt": "x", "max_tokens": 5})
    got = loaded_worker.collect(["mv", "other"])
    got["mv"].insert(0, first)
    assert token_ids(got["mv"]) == token_ids(want)  # greedy: the same answer in either lane
    if got["mv"][-1]["finish_reason"] == "stop":
        jsonschema.validate(json.loads(text_of(got["mv"])), schema)


def test_stop_strings_and_max_tokens_cut_a_constrained_answer(
    loaded_worker: WorkerProcess,
) -> None:
    full = ask(loaded_worker, "full", response_format=schema_format(SCHEMAS[0]))
    text = text_of(full)
    cut = ask(loaded_worker, "cut", response_format=schema_format(SCHEMAS[0]), max_tokens=3)
    assert cut[-1]["finish_reason"] == "length" and len(token_ids(cut)) == 3
    stopped = ask(loaded_worker, "st", response_format=schema_format(SCHEMAS[0]), stop=[":"])
    assert stopped[-1]["finish_reason"] == "stop_sequence"
    assert text_of(stopped) == text[: text.index(":")]


def test_the_legacy_dialect_takes_a_response_format(loaded_worker: WorkerProcess) -> None:
    request = {"cmd": "generate", "prompt": "x", "max_tokens": 200}
    loaded_worker.send({**request, "response_format": schema_format(SCHEMAS[1])})
    lines = loaded_worker.read_until_terminal(None)
    assert lines[-1].get("done") is True
    if lines[-1].get("finish_reason") == "stop":
        jsonschema.validate(json.loads(text_of(lines)), SCHEMAS[1])


DEEP: dict[str, Any] = {"type": "object"}
for _ in range(70):
    DEEP = {"type": "object", "properties": {"a": DEEP}}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"response_format": "json"}, "response_format"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"response_format": {"type": 5}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {}}},
            "response_format.json_schema.schema",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": [1, 2]}}},
            "response_format.json_schema.schema",
        ),
        (
            {"response_format": schema_format({"type": "integer", "minimum": 5, "maximum": 1})},
            "response_format.json_schema.schema",
        ),
        ({"response_format": schema_format({"type": "strange"})}, "response_format"),
        ({"response_format": schema_format({"$ref": "#/nowhere"})}, "response_format"),
        ({"response_format": schema_format(DEEP)}, "response_format.json_schema.schema"),
        ({"grammar": {"type": "regex", "regex": "[unclosed"}}, "grammar.regex"),
        ({"grammar": {"type": "regex", "regex": ""}}, "grammar.regex"),
        ({"grammar": {"type": "regex", "regex": "a\u0000b"}}, "grammar.regex"),
        ({"grammar": {"type": "regex", "regex": "a" * 300_000}}, "grammar.regex"),
        ({"grammar": {"type": "lark", "lark": "start: undefined_rule"}}, "grammar.lark"),
        ({"grammar": {"type": "lark", "lark": 42}}, "grammar.lark"),
        ({"grammar": {"type": "ebnf", "ebnf": "x"}}, "grammar.type"),
        ({"grammar": []}, "grammar"),
        (
            {
                "grammar": {"type": "regex", "regex": "a"},
                "response_format": {"type": "json_object"},
            },
            "grammar",
        ),
    ],
)
def test_hostile_constraints_are_invalid_request(
    loaded_worker: WorkerProcess, fields: dict[str, Any], field: str
) -> None:
    reply = loaded_worker.call({"cmd": "generate", "id": "h", "prompt": "x", **fields})
    assert reply["type"] == "error" and reply["code"] == "invalid_request", reply
    assert reply["error"].startswith(field), reply["error"]
    assert loaded_worker.call({"cmd": "ping", "id": "alive"})["type"] == "pong"


def test_chat_takes_a_response_format(loaded_worker: WorkerProcess) -> None:
    messages = [{"role": "user", "content": "Describe a person as JSON."}]
    lines = loaded_worker.request(
        {
            "cmd": "chat",
            "id": "chat",
            "messages": messages,
            "max_tokens": 200,
            "response_format": schema_format(SCHEMAS[0]),
        }
    )
    if lines[-1]["finish_reason"] == "stop":
        jsonschema.validate(json.loads(text_of(lines)), SCHEMAS[0])
    else:
        assert lines[-1]["finish_reason"] == "length"
