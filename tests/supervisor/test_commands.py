"""The request builders of ``supervisor.commands`` against the protocol's own parser.

The supervisor keeps its own typed list of sampling options and of the reply
each command ends with; these tests keep them in step with ``protocol``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.requests import COMMANDS, SAMPLING_OPTIONS, Chat, Generate, Sampling, parse_request
from supervisor import InvalidArgument, commands
from supervisor.core import WorkerCore
from supervisor.lifecycle import QuitSink


def _parsed(cmd: str, fields: commands.Fields) -> object:
    """The request as the worker reads the line the supervisor writes."""
    _, line = WorkerCore().open(cmd, fields, QuitSink())
    return parse_request(orjson.loads(line))


def test_sampling_options_are_the_protocols() -> None:
    aliases = {"repeat_penalty"}  # accepted by the worker, never sent by the supervisor
    shape = {"response_format", "grammar"}  # the answer's shape, beside the sampling options
    options = set(commands.SamplingOptions.__annotations__)
    assert options == (set(SAMPLING_OPTIONS) - aliases) | shape


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


# -- any Python value: a valid request line, or InvalidArgument ------------------------------

_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=st.characters(codec="utf-8") | st.just("\0"), max_size=8),
    st.binary(max_size=4),
    st.just(object()),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.tuples(inner)
        | st.dictionaries(st.text(max_size=4) | st.integers(0, 9), inner, max_size=3)
    ),
    max_leaves=8,
)
_GOOD_MESSAGES = st.just([{"role": "user", "content": "hi"}])
_SAMPLING_KEYS = st.sampled_from([*commands.SamplingOptions.__annotations__, "max_token"])


def _sent_or_refused(cmd: str, build: Callable[[], commands.Fields]) -> None:
    """The builder either raises InvalidArgument or returns fields whose line
    the worker's parser accepts; nothing else."""
    try:
        fields = build()
    except InvalidArgument as exc:
        assert exc.code == "invalid_request" and exc.message
        return
    _parsed(cmd, fields)


@given(st.lists(_VALUES, min_size=6, max_size=6))
@settings(max_examples=150, deadline=None)
def test_load_fields_of_any_values(v: list[Any]) -> None:
    _sent_or_refused(
        "load",
        lambda: commands.load_fields(
            v[0],
            adapter_path=v[1],
            context_len=v[2],
            trust_remote_code=v[3],
            force=v[4],
            extra=v[5],
        ),
    )


@given(_VALUES, st.dictionaries(_SAMPLING_KEYS, _VALUES, max_size=4), _VALUES, _VALUES)
@settings(max_examples=150, deadline=None)
def test_generate_fields_of_any_values(
    prompt: Any, sampling: dict[str, Any], cache_key: Any, extra: Any
) -> None:
    _sent_or_refused(
        "generate",
        lambda: commands.generate_fields(
            prompt, commands.sampling_fields(sampling), cache_key=cache_key, extra=extra
        ),
    )


@given(
    _GOOD_MESSAGES | _VALUES,
    st.dictionaries(_SAMPLING_KEYS, _VALUES, max_size=3),
    st.lists(_VALUES, min_size=3, max_size=3),
)
@settings(max_examples=150, deadline=None)
def test_chat_fields_of_any_values(messages: Any, sampling: dict[str, Any], v: list[Any]) -> None:
    _sent_or_refused(
        "chat",
        lambda: commands.chat_fields(
            messages,
            commands.sampling_fields(sampling),
            chat_template_kwargs=v[0],
            tools=v[1],
            cache_key=v[2],
        ),
    )


@given(_VALUES, _VALUES, _VALUES)
@settings(max_examples=150, deadline=None)
def test_the_other_builders_of_any_values(a: Any, b: Any, tokens: Any) -> None:
    _sent_or_refused("tokenize", lambda: commands.tokenize_fields(a, add_special_tokens=b))
    _sent_or_refused("detokenize", lambda: commands.detokenize_fields(tokens))
    _sent_or_refused("inspect", lambda: commands.inspect_fields(a, b))
