"""The fields of each request, built from Python arguments; shared by both twins.

Options left as ``None`` are not sent, so the worker's defaults apply.
``extra`` adds fields as they are (newer protocol fields, or ``mock_worker``'s
``"mock": {...}`` fault options) and wins over the built ones.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TypedDict, cast

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


def _merge(fields: Fields, extra: Extra | None) -> Fields:
    if extra:
        fields.update(cast("Fields", extra))
    return fields


def load_fields(
    path: str,
    *,
    adapter_path: str | None = None,
    context_len: int | None = None,
    trust_remote_code: bool = False,
    force: bool = False,
    extra: Extra | None = None,
) -> Fields:
    fields: Fields = {"path": path}
    if adapter_path is not None:
        fields["adapter_path"] = adapter_path
    if context_len is not None:
        fields["context_len"] = context_len
    if trust_remote_code:
        fields["trust_remote_code"] = True
    if force:
        fields["force"] = True
    return _merge(fields, extra)


class SamplingOptions(TypedDict, total=False):
    """Decoding options of ``generate`` and ``chat`` (docs/protocol.md)."""

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


def sampling_fields(options: SamplingOptions) -> Fields:
    fields: Fields = {}
    for key, value in options.items():
        if value is None:
            continue
        if key == "logit_bias":
            bias = cast("Mapping[int, float]", value)
            fields[key] = {str(k): float(v) for k, v in bias.items()}
        elif key == "stop":
            fields[key] = [value] if isinstance(value, str) else list(cast("Sequence[str]", value))
        else:
            fields[key] = cast(JsonValue, value)
    return fields


def generate_fields(
    prompt: str,
    sampling: Fields,
    *,
    cache_key: str | None = None,
    extra: Extra | None = None,
) -> Fields:
    fields: Fields = {"prompt": prompt, **sampling}
    if cache_key is not None:
        fields["cache_key"] = cache_key
    return _merge(fields, extra)


def chat_fields(
    messages: Sequence[Message],
    sampling: Fields,
    *,
    chat_template_kwargs: Mapping[str, object] | None = None,
    tools: Sequence[Mapping[str, object]] | None = None,
    cache_key: str | None = None,
    extra: Extra | None = None,
) -> Fields:
    fields: Fields = {"messages": [cast("dict[str, JsonValue]", dict(m)) for m in messages]}
    fields.update(sampling)
    if chat_template_kwargs is not None:
        fields["chat_template_kwargs"] = cast("dict[str, JsonValue]", dict(chat_template_kwargs))
    if tools is not None:
        fields["tools"] = [cast("dict[str, JsonValue]", dict(t)) for t in tools]
    if cache_key is not None:
        fields["cache_key"] = cache_key
    return _merge(fields, extra)


def tokenize_fields(text: str, *, add_special_tokens: bool = True) -> Fields:
    fields: Fields = {"text": text}
    if not add_special_tokens:
        fields["add_special_tokens"] = False
    return fields


def detokenize_fields(tokens: Sequence[int]) -> Fields:
    return {"tokens": list(tokens)}


def inspect_fields(prompt: str, directory: str | os.PathLike[str] | None) -> Fields:
    fields: Fields = {"prompt": prompt}
    if directory is not None:
        fields["dir"] = os.fspath(directory)
    return fields
