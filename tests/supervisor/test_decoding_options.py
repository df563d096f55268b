"""The supervisor's typed arguments for a draft model, ``num_draft_tokens`` and structured output."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from supervisor import AsyncWorker, InvalidArgument, Worker
from tests.supervisor.conftest import ENV, ROOT

pytestmark = pytest.mark.timeout(120)

SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "maximum": 99}, "s": {"enum": ["a", "b"]}},
    "required": ["n", "s"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}}


def test_draft_and_structured_output_through_worker(tiny_model: Path) -> None:
    with Worker(env=ENV, cwd=ROOT, start_timeout=120) as worker:
        loaded = worker.load(tiny_model, draft_path=str(tiny_model))
        assert loaded.model.draft == str(tiny_model)
        stream = worker.generate("hello", max_tokens=24, temperature=0.0, num_draft_tokens=3)
        assert stream.text()
        assert (stream.result.usage.draft_tokens_accepted or 0) > 0
        shaped = worker.generate("x", max_tokens=64, response_format=FORMAT)
        text = shaped.text()
        if shaped.result.finish_reason == "stop":
            answer = json.loads(text)
            assert set(answer) == {"n", "s"}
        regex = worker.chat(
            [{"role": "user", "content": "A year?"}],
            max_tokens=16,
            grammar={"type": "regex", "regex": "[0-9]{4}"},
        )
        assert len(regex.text()) == 4


@pytest.mark.parametrize(
    "options",
    [
        {"num_draft_tokens": -1},
        {"num_draft_tokens": 99},
        {"response_format": {"type": "yaml"}},
        {"grammar": {"type": "regex"}},
        {"response_format": {"type": "json_object"}, "grammar": {"type": "regex", "regex": "a"}},
    ],
)
def test_bad_decoding_options_are_refused_before_sending(options: dict[str, object]) -> None:
    with Worker(env=ENV, cwd=ROOT, start_timeout=120) as worker:
        with pytest.raises(InvalidArgument):
            worker.generate("x", **options)  # type: ignore[call-overload]
        worker.ping()  # and the worker serves on


def test_a_bad_draft_path_is_refused_before_sending() -> None:
    with Worker(env=ENV, cwd=ROOT, start_timeout=120) as worker:
        with pytest.raises(InvalidArgument):
            worker.load("/m", draft_path="a\0b")
        worker.ping()


def test_the_async_twin_takes_them_too(tiny_model: Path) -> None:
    async def main() -> str:
        async with AsyncWorker(env=ENV, cwd=ROOT, start_timeout=120) as worker:
            await worker.load(tiny_model, draft_path=str(tiny_model))
            stream = worker.generate(
                "x", max_tokens=8, grammar={"type": "regex", "regex": "[ab]{3}"}
            )
            async with stream:
                return await stream.text()

    assert len(asyncio.run(main())) == 3
