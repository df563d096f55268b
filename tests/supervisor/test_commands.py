"""The request builders of ``supervisor.commands`` against the protocol's own parser.

The supervisor keeps its own typed list of sampling options and of the reply
each command ends with; these tests keep them in step with ``protocol``.
"""

from __future__ import annotations

import orjson

from protocol.requests import COMMANDS, SAMPLING_OPTIONS, Chat, Generate, Sampling, parse_request
from supervisor import commands
from supervisor.core import WorkerCore
from supervisor.lifecycle import QuitSink


def _parsed(cmd: str, fields: commands.Fields) -> object:
    """The request as the worker reads the line the supervisor writes."""
    _, line = WorkerCore().open(cmd, fields, QuitSink())
    return parse_request(orjson.loads(line))


def test_sampling_options_are_the_protocols() -> None:
    aliases = {"repeat_penalty"}  # accepted by the worker, never sent by the supervisor
    assert set(commands.SamplingOptions.__annotations__) == set(SAMPLING_OPTIONS) - aliases


def test_every_command_but_cancel_has_its_expected_reply() -> None:
    assert set(commands.EXPECTED_REPLY) == set(COMMANDS) - {"cancel"}
    assert commands.STREAMING <= set(commands.EXPECTED_REPLY)


def test_every_sampling_option_reaches_the_parser_as_given() -> None:
    options: commands.SamplingOptions = {
        "max_tokens": 7,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 40,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "repetition_context_size": 32,
        "logit_bias": {5: -1.5, 9: 2},
        "seed": 3,
        "stop": "END",
        "logprobs": 2,
    }
    fields = commands.generate_fields(
        "hi", commands.sampling_fields(options), cache_key="k", extra={"x": 1}
    )
    request = _parsed("generate", fields)
    assert isinstance(request, Generate)
    assert request.prompt == "hi" and request.cache_key == "k"
    assert request.sampling == Sampling(
        max_tokens=7,
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        repetition_penalty=1.1,
        repetition_context_size=32,
        logit_bias=((5, -1.5), (9, 2.0)),
        seed=3,
        stop=("END",),
        logprobs=2,
    )


def test_chat_fields_reach_the_parser() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    fields = commands.chat_fields(
        [{"role": "user", "content": "hi"}],
        commands.sampling_fields({"stop": ["a", "b"]}),
        chat_template_kwargs={"enable_thinking": False},
        tools=[tool],
    )
    request = _parsed("chat", fields)
    assert isinstance(request, Chat)
    assert [(m.role, m.content) for m in request.messages] == [("user", "hi")]
    assert request.sampling.stop == ("a", "b")
    assert request.chat_template_kwargs == {"enable_thinking": False}
    assert request.tools == (tool,)
