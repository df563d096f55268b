"""The fields of each request, built from Python arguments; shared by both twins.

Options left as ``None`` are not sent, so the worker's defaults apply.
``extra`` adds fields as they are (newer protocol fields, or ``mock_worker``'s
``"mock": {...}`` fault options) and wins over the built ones.

Every builder ends in :func:`checked`: the fields become the plain JSON the
worker will read (:func:`~supervisor.arguments.json_value`) and go through
the protocol's own request parser, so an argument the worker would refuse,
or that JSON cannot carry, raises :class:`~supervisor.errors.InvalidArgument`
here, before anything is sent.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import TypedDict

from protocol.errors import WireError
from protocol.fields import JsonValue
from protocol.replies import (
    Bye,
    Done,
    HelloReply,
    InfoReply,
    Inspected,
    Loaded,
    Pong,
    Reply,
    TextReply,
    TokensReply,
    Unloaded,
)
from protocol.requests import parse_request

from . import arguments
from .errors import InvalidArgument

Fields = dict[str, JsonValue]
Message = Mapping[str, object]
"""A chat message: ``role``, ``content`` and the other OpenAI fields, JSON-able."""
Extra = Mapping[str, object]
"""Fields sent as they are; values must be JSON-able."""

# The one reply type each command ends with (an ``error`` ends any of them).
EXPECTED_REPLY: dict[str, type[Reply]] = {
    "hello": HelloReply,
    "ping": Pong,
    "load": Loaded,
    "unload": Unloaded,
    "generate": Done,
    "chat": Done,
    "info": InfoReply,
    "tokenize": TokensReply,
    "detokenize": TextReply,
    "inspect": Inspected,
    "quit": Bye,
}
STREAMING = frozenset({"generate", "chat"})


# The fields that name files: a NUL byte can never be part of a path.
_PATH_FIELDS = {"load": ("path", "adapter_path", "draft_path"), "inspect": ("dir",)}


def checked(cmd: str, fields: Mapping[str, object]) -> Fields:
    """``fields`` as the JSON the worker will read, refused with
    :class:`InvalidArgument` unless the protocol's parser accepts them."""
    try:
        data = arguments.json_value(fields, "")
    except InvalidArgument as exc:
        raise InvalidArgument(f"{cmd}: {exc.message}") from None
    assert isinstance(data, dict)
    for key in _PATH_FIELDS.get(cmd, ()):
        value = data.get(key)
        if isinstance(value, str) and "\0" in value:
            raise InvalidArgument(f"{cmd}: {key}: a path must not contain a NUL byte")
    try:
        parse_request({**data, "cmd": cmd, "id": 1})
    except WireError as exc:
        raise InvalidArgument(f"{cmd}: {exc.message}") from None
    return data


def _merge(fields: dict[str, object], extra: Extra | None) -> dict[str, object]:
    if extra is not None:
        if not isinstance(extra, Mapping):
            raise InvalidArgument(f"extra: must be a mapping of fields, got {type(extra).__name__}")
        fields.update(extra)
    return fields


def load_fields(
    path: object,
    *,
    adapter_path: object = None,
    draft_path: object = None,
    context_len: int | None = None,
    trust_remote_code: bool = False,
    force: bool = False,
    progress: bool = False,
    extra: Extra | None = None,
) -> Fields:
    fields: dict[str, object] = {"path": arguments.path("path", path)}
    if adapter_path is not None:
        fields["adapter_path"] = arguments.path("adapter_path", adapter_path)
    if draft_path is not None:
        fields["draft_path"] = arguments.path("draft_path", draft_path)
    if context_len is not None:
        fields["context_len"] = context_len
    if trust_remote_code is not False:  # anything else than False goes to the parser
        fields["trust_remote_code"] = trust_remote_code
    if force is not False:
        fields["force"] = force
    _progress(fields, progress)
    return checked("load", _merge(fields, extra))


def without_progress(fields: Fields) -> Fields:
    """``fields`` less ``progress``: what a reload after a restart sends."""
    return {key: value for key, value in fields.items() if key != "progress"}


def _progress(fields: dict[str, object], progress: object) -> None:
    """``progress`` goes to the parser unless it is False (the default)."""
    if progress is not False:
        fields["progress"] = progress


class SamplingOptions(TypedDict, total=False):
    """Decoding options of ``generate`` and ``chat`` (docs/protocol.md):
    the sampling options, ``num_draft_tokens`` (speculative decoding), and
    the answer's shape, ``response_format`` or ``grammar`` (Structured output)."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    repetition_context_size: int
    logit_bias: Mapping[int, float]
    seed: int
    stop: str | Sequence[str]
    logprobs: int
    num_draft_tokens: int
    response_format: Mapping[str, object]
    grammar: Mapping[str, object]


_SAMPLING = tuple(SamplingOptions.__annotations__)


def sampling_fields(options: Mapping[str, object]) -> dict[str, object]:
    """The sampling keyword arguments as fields (checked with the request).
    A name that is not an option (a typo: ``max_token``) is refused."""
    fields: dict[str, object] = {}
    for key, value in options.items():
        if key not in _SAMPLING:
            raise InvalidArgument(f"{key}: not a decoding option; they are {', '.join(_SAMPLING)}")
        if value is None:
            continue
        if key == "logit_bias" and isinstance(value, Mapping):
            value = {
                str(k) if isinstance(k, int) and not isinstance(k, bool) else k: v
                for k, v in value.items()
            }
        elif key == "stop" and isinstance(value, str):
            value = [value]
        fields[key] = value
    return fields


def generate_fields(
    prompt: str,
    sampling: Mapping[str, object],
    *,
    cache_key: str | None = None,
    progress: bool = False,
    extra: Extra | None = None,
) -> Fields:
    fields: dict[str, object] = {"prompt": prompt, **sampling}
    if cache_key is not None:
        fields["cache_key"] = cache_key
    _progress(fields, progress)
    return checked("generate", _merge(fields, extra))


def chat_fields(
    messages: Sequence[Message],
    sampling: Mapping[str, object],
    *,
    chat_template_kwargs: Mapping[str, object] | None = None,
    tools: Sequence[Mapping[str, object]] | None = None,
    cache_key: str | None = None,
    progress: bool = False,
    extra: Extra | None = None,
) -> Fields:
    fields: dict[str, object] = {"messages": messages, **sampling}
    if chat_template_kwargs is not None:
        fields["chat_template_kwargs"] = chat_template_kwargs
    if tools is not None:
        fields["tools"] = tools
    if cache_key is not None:
        fields["cache_key"] = cache_key
    _progress(fields, progress)
    return checked("chat", _merge(fields, extra))


def tokenize_fields(text: str, *, add_special_tokens: bool = True) -> Fields:
    fields: dict[str, object] = {"text": text}
    if add_special_tokens is not True:
        fields["add_special_tokens"] = add_special_tokens
    return checked("tokenize", fields)


def detokenize_fields(tokens: Sequence[int]) -> Fields:
    """Any iterable of integers (``operator.index``: numpy's too), not bools."""
    if isinstance(tokens, str | bytes | Mapping):
        raise InvalidArgument(
            f"tokens: must be a sequence of token ids, got {type(tokens).__name__}"
        )
    try:
        items = list(tokens)
    except TypeError:
        raise InvalidArgument(
            f"tokens: must be a sequence of token ids, got {type(tokens).__name__}"
        ) from None
    ids: list[object] = []
    for i, token in enumerate(items):
        try:
            ids.append(operator.index(token) if not isinstance(token, bool) else None)
        except TypeError:
            ids.append(None)
        if ids[-1] is None:
            raise InvalidArgument(
                f"tokens[{i}]: must be an integer token id, got {type(token).__name__}"
            )
    return checked("detokenize", {"tokens": ids})


def inspect_fields(prompt: str, directory: object) -> Fields:
    fields: dict[str, object] = {"prompt": prompt}
    if directory is not None:
        fields["dir"] = arguments.path("directory", directory)
    return checked("inspect", fields)
