"""Requests: one frozen class per command, decoded once at the edge.

``parse_request`` turns one decoded JSON object into one of these classes or
raises a :class:`~protocol.errors.WireError` naming the bad field. Unknown
fields are ignored, so hosts may send fields from newer protocol versions;
``parse_request_checked`` also names them, so the worker can log them, and
``strict=True`` refuses them. The fields each command knows are listed once,
in ``REQUEST_FIELDS`` (and ``MESSAGE_FIELDS``, ``CONTENT_PART_FIELDS``,
``IMAGE_URL_FIELDS`` inside ``chat`` messages); a test checks that the
parsers read exactly these.

Limits at the edge: every integer a request carries is bounded (counts and
sizes by ``MAX_INT32``, ``seed`` by 2^64 - 1), no value nests deeper than
``MAX_JSON_DEPTH`` levels (a tool call's ``arguments`` text included), and a
path holds no NUL character, so nothing behind the parser meets a value it
cannot represent.

A request without ``id`` belongs to the legacy (go-mlx) dialect; with an
``id`` (string or integer) every line that answers it echoes the id.
``progress: true`` (``generate``, ``chat``, ``load``) needs an id: go-mlx
reads every line of a stream up to ``done`` as a token, so a legacy request
never gets lines it does not know.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from .errors import InvalidJson, InvalidRequest, RequestId, UnknownCommand
from .fields import (
    MAX_INT32,
    MAX_JSON_DEPTH,
    Fields,
    JsonValue,
    describe,
    text_too_deep,
    too_deep,
)

MAX_LOGPROBS = 20
DEFAULT_MAX_TOKENS = 256
# The roles a chat message may have: OpenAI's (``developer`` is its newer
# name for ``system``, passed to the template as it is, as mlx-vlm's server
# does) and ``tool`` for tool results.
ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(frozen=True, slots=True, kw_only=True)
class Sampling:
    """Decoding options shared by ``generate`` and ``chat``."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    repetition_context_size: int = 20
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int = 0
    # Tokens the loaded draft model proposes per step (speculative decoding);
    # None: the worker's default when a draft is loaded; 0: no draft.
    num_draft_tokens: int | None = None


# Most draft tokens one step may propose.
MAX_DRAFT_TOKENS = 32


@dataclass(frozen=True, slots=True, kw_only=True)
class TextPart:
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ImagePart:
    url: str


ContentPart = TextPart | ImagePart


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatMessage:
    role: str
    content: str | tuple[ContentPart, ...] | None = None
    name: str | None = None
    tool_calls: tuple[JsonValue, ...] | None = None
    tool_call_id: str | None = None

    @property
    def images(self) -> tuple[ImagePart, ...]:
        if isinstance(self.content, tuple):
            return tuple(p for p in self.content if isinstance(p, ImagePart))
        return ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello:
    id: RequestId | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Ping:
    id: RequestId | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Load:
    id: RequestId | None = None
    path: str
    adapter_path: str | None = None
    # A small model with the same tokenizer, for speculative decoding.
    draft_path: str | None = None
    context_len: int | None = None
    trust_remote_code: bool = False
    force: bool = False
    # Ask for ``progress`` events while loading (addressed dialect only).
    progress: bool = False
    # Sent by go-mlx; accepted and ignored (MLX has no partial offload or slots here).
    gpu_layers: int | None = None
    parallel_slots: int | None = None
    # Fault injection for mock_worker (see mock_worker/README.md); the real worker ignores it.
    mock: Mapping[str, JsonValue] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Unload:
    id: RequestId | None = None


# What ``response_format`` and ``grammar`` may ask the output to be.
CONSTRAINT_KINDS: tuple[str, ...] = ("json_object", "json_schema", "regex", "lark")
# The longest grammar text (a schema's JSON, a regex, a Lark grammar) a request may give.
MAX_GRAMMAR_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputConstraint:
    """The shape the answer must have: ``kind`` is one of :data:`CONSTRAINT_KINDS`;
    ``source`` is the JSON Schema as JSON text (keys in the order sent), the regular
    expression, or the Lark grammar ("" for ``json_object``); ``field`` names
    where the request gave it, for errors (``response_format.json_schema.schema``)."""

    kind: str
    source: str
    field: str
    name: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Generate:
    id: RequestId | None = None
    prompt: str
    sampling: Sampling = field(default_factory=Sampling)
    # Names the prompt-cache slot to reuse and refill; None is the default slot.
    cache_key: str | None = None
    # Ask for ``progress`` events during prefill (addressed dialect only).
    progress: bool = False
    # ``response_format`` or ``grammar``: the answer's shape, enforced token by token.
    constraint: OutputConstraint | None = None
    # Fault injection for mock_worker (see mock_worker/README.md); the real worker ignores it.
    mock: Mapping[str, JsonValue] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Chat:
    id: RequestId | None = None
    messages: tuple[ChatMessage, ...]
    sampling: Sampling = field(default_factory=Sampling)
    chat_template_kwargs: Mapping[str, JsonValue] | None = None
    # OpenAI-style tool definitions, passed to the chat template as ``tools=``.
    tools: tuple[Mapping[str, JsonValue], ...] | None = None
    # Names the prompt-cache slot to reuse and refill; None is the default slot.
    cache_key: str | None = None
    # Ask for ``progress`` events during prefill (addressed dialect only).
    progress: bool = False
    # ``response_format`` or ``grammar``: the answer's shape, enforced token by token.
    constraint: OutputConstraint | None = None
    # OpenAI's ``tool_choice``: "auto", "none", "required", or "function" with
    # ``tool_name`` set (that tool only).
    tool_choice: str = "auto"
    tool_name: str | None = None
    # Fault injection for mock_worker (see mock_worker/README.md); the real worker ignores it.
    mock: Mapping[str, JsonValue] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Info:
    id: RequestId | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Tokenize:
    id: RequestId | None = None
    text: str
    add_special_tokens: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class Detokenize:
    id: RequestId | None = None
    tokens: tuple[int, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Inspect:
    """Capture every layer's attention queries and keys for ``prompt`` into
    files under ``dir`` (a new private temporary directory when None)."""

    id: RequestId | None = None
    prompt: str
    dir: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Cancel:
    """Cancel request ``id``, or everything in flight when ``id`` is absent.

    ``cancel`` itself never gets a reply: the cancelled request's own terminal
    line is the answer.
    """

    id: RequestId | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Quit:
    id: RequestId | None = None


Request = (
    Hello
    | Ping
    | Load
    | Unload
    | Generate
    | Chat
    | Info
    | Tokenize
    | Detokenize
    | Inspect
    | Cancel
    | Quit
)
GenerationRequest = Generate | Chat


def parse_request_id(raw: Mapping[str, object]) -> RequestId | None:
    value = raw.get("id")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        if not -(2**63) <= value < 2**64:  # what JSON parsers (and replies) carry
            raise InvalidRequest("id: an integer id must lie from -2^63 to 2^64 - 1")
        return value
    raise InvalidRequest(f"id: must be a string or an integer, got {describe(value)}")


def parse_request(raw: object, *, strict: bool = False) -> Request:
    """Decode one JSON value (already parsed) into a request. Unknown fields
    are ignored, or with ``strict`` refused (``invalid_request`` naming the
    first)."""
    return parse_request_checked(raw, strict=strict)[0]


def parse_request_checked(raw: object, *, strict: bool = False) -> tuple[Request, tuple[str, ...]]:
    """``parse_request``, and the paths of the unknown fields the request
    carried (``max_token``, ``messages[0].contnet``), which were ignored."""
    if not isinstance(raw, dict):
        raise InvalidJson(f"a request must be a JSON object, got {describe(raw)}")
    request_id = parse_request_id(raw)
    deep = too_deep(raw)
    if deep is not None:
        raise InvalidRequest(
            f"{deep}: nested deeper than {MAX_JSON_DEPTH} levels", request_id=request_id
        )
    # int32: every integer of a request is bounded (beyond 32 bits only where
    # a field says so: seed)
    f = Fields(raw, request_id=request_id, int32=True)
    cmd = f.required_str("cmd")
    parser = _PARSERS.get(cmd)
    if parser is None:
        raise UnknownCommand(
            f"cmd: unknown command {_short(repr(cmd))}; known: {', '.join(COMMANDS)}",
            request_id=request_id,
        )
    request = parser(f, request_id)
    unknown = unknown_fields(raw)
    if strict and unknown:
        raise InvalidRequest(
            f"{_short(unknown[0])}: unknown field{_did_you_mean(raw, unknown[0])} "
            "(refused: the worker runs with --strict)",
            request_id=request_id,
        )
    return request, unknown


def unknown_fields(raw: Mapping[str, object]) -> tuple[str, ...]:
    """The paths of the fields of a request (whose ``cmd`` is known) that no
    parser reads, in the order they were sent. Free-form values (``tools``,
    ``tool_calls``, ``chat_template_kwargs``, ``logit_bias``, ``mock``) are
    passed on whole and not looked into."""
    known = REQUEST_FIELDS.get(str(raw.get("cmd")), frozenset())
    out = [key for key in raw if key not in known]
    messages = raw.get("messages") if raw.get("cmd") == "chat" else None
    for i, message in enumerate(messages if isinstance(messages, list) else ()):
        if not isinstance(message, dict):
            continue
        out.extend(f"messages[{i}].{k}" for k in message if k not in MESSAGE_FIELDS)
        content = message.get("content")
        for j, part in enumerate(content if isinstance(content, list) else ()):
            if not isinstance(part, dict):
                continue
            where = f"messages[{i}].content[{j}]"
            out.extend(f"{where}.{k}" for k in part if k not in CONTENT_PART_FIELDS)
            image = part.get("image_url")
            if isinstance(image, dict):
                out.extend(f"{where}.image_url.{k}" for k in image if k not in IMAGE_URL_FIELDS)
    return tuple(out)


def field_list(paths: Sequence[str], *, most: int = 20) -> str:
    """``paths`` for a log line: each once, in order, at most ``most`` of
    them, each cut to 80 characters (a request may carry any keys)."""
    unique = list(dict.fromkeys(paths))
    shown = ", ".join(_short(p) for p in unique[:most])
    return shown if len(unique) <= most else f"{shown} and {len(unique) - most} more"


def _short(path: str, most: int = 80) -> str:
    return path if len(path) <= most else f"{path[:most]}…"


def _did_you_mean(raw: Mapping[str, object], path: str) -> str:
    """`` (did you mean 'max_tokens'?)`` for a top-level typo, else ''."""
    if path not in raw or len(path) > 64:
        return ""
    import difflib  # here: only a refused typo needs it

    close = difflib.get_close_matches(path, REQUEST_FIELDS.get(str(raw.get("cmd")), ()), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _sampling(f: Fields) -> Sampling:
    repetition_penalty = f.number("repetition_penalty", 0.0, minimum=0.0)
    if not repetition_penalty:
        repetition_penalty = f.number("repeat_penalty", 0.0, minimum=0.0)
    bias: list[tuple[int, float]] = []
    for key, value in (f.object_("logit_bias") or {}).items():
        name = f"logit_bias[{_short(repr(key))}]"
        # the length bound first: int() of a 5,000-digit text raises ValueError
        if not (key.isascii() and key.isdigit() and len(key) <= 10 and int(key) <= MAX_INT32):
            raise f.fail(name, f"keys must be token ids (decimal integers from 0 to {MAX_INT32})")
        bias.append((int(key), Fields({name: value}, request_id=f.request_id).number(name, 0.0)))
    return Sampling(
        max_tokens=f.int_("max_tokens", DEFAULT_MAX_TOKENS, minimum=1) or DEFAULT_MAX_TOKENS,
        temperature=f.number("temperature", 0.0, minimum=0.0),
        top_p=f.number("top_p", 1.0, minimum=0.0, maximum=1.0) or 1.0,
        top_k=f.int_("top_k", 0, minimum=0) or 0,
        min_p=f.number("min_p", 0.0, minimum=0.0, maximum=1.0),
        repetition_penalty=repetition_penalty or None,
        repetition_context_size=f.int_("repetition_context_size", 20, minimum=1) or 20,
        logit_bias=tuple(bias),
        seed=f.int_("seed", minimum=0, maximum=2**64 - 1),
        stop=f.str_list("stop"),
        logprobs=f.int_("logprobs", 0, minimum=0, maximum=MAX_LOGPROBS) or 0,
        num_draft_tokens=f.int_("num_draft_tokens", minimum=0, maximum=MAX_DRAFT_TOKENS),
    )


def _content(f: Fields, key: str) -> str | tuple[ContentPart, ...] | None:
    value = f.raw(key)
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise f.fail(key, f"must be a string or a list of content parts, got {describe(value)}")
    parts: list[ContentPart] = []
    for part in f.objects(key) or []:
        kind = part.required_str("type")
        if kind == "text":
            parts.append(TextPart(text=part.required_str("text")))
        elif kind in ("image_url", "image"):
            image = part.raw("image_url")
            url = (
                part.nested("image_url", image).path_("url", required=True)
                if isinstance(image, dict)
                else part.path_("image_url") or part.path_("image")
            )
            if url is None:
                raise part.fail("image_url", "required")
            parts.append(ImagePart(url=url))
        else:
            raise part.fail("type", f"must be 'text' or 'image_url', got {_short(repr(kind))}")
    return tuple(parts)


def _message(m: Fields) -> ChatMessage:
    role = m.required_str("role", nonempty=True)
    if role not in ROLES:
        raise m.fail("role", f"must be one of {', '.join(ROLES)}; got {_short(repr(role))}")
    content = _content(m, "content")
    name = m.str_("name")
    tool_calls = m.list_("tool_calls")
    for i, call in enumerate(tool_calls or ()):
        arguments = _arguments(call)
        if arguments is not None and text_too_deep(arguments):
            raise m.fail(
                f"tool_calls[{i}].function.arguments",
                f"nested deeper than {MAX_JSON_DEPTH} levels",
            )
    tool_call_id = m.str_("tool_call_id")
    if content is None and not (role == "assistant" and tool_calls):
        raise m.fail(
            "content", "required (only an assistant message with tool_calls may leave it out)"
        )
    return ChatMessage(
        role=role,
        content=content,
        name=name,
        tool_calls=tuple(tool_calls) if tool_calls is not None else None,  # type: ignore[arg-type]
        tool_call_id=tool_call_id,
    )


def _arguments(call: object) -> str | None:
    """A tool call's ``function.arguments`` when it is a JSON text."""
    function = call.get("function") if isinstance(call, dict) else None
    arguments = function.get("arguments") if isinstance(function, dict) else None
    return arguments if isinstance(arguments, str) else None


def _tools(f: Fields) -> tuple[Mapping[str, JsonValue], ...] | None:
    """OpenAI's ``tools``: ``[{"type":"function","function":{"name":…,…}}]``."""
    tools = f.objects("tools")
    if tools is None:
        return None
    for tool in tools:
        kind = tool.str_("type")
        if kind is not None and kind != "function":
            raise tool.fail("type", f"must be 'function', got {_short(repr(kind))}")
        spec = tool.required_child("function")
        spec.required_str("name", nonempty=True)
        spec.object_("parameters")
    return tuple(f.list_("tools") or ())  # type: ignore[arg-type]


def _constraint(f: Fields) -> OutputConstraint | None:
    """``response_format`` (OpenAI's shape) or ``grammar``, at most one of them."""
    fmt = f.child("response_format")
    grammar = f.child("grammar")
    constraint = _response_format(fmt) if fmt is not None else None
    if grammar is not None:
        if constraint is not None:
            raise f.fail("grammar", "give response_format or grammar, not both")
        constraint = _grammar(grammar)
    if constraint is not None:
        size = len(constraint.source.encode("utf-8", "surrogatepass"))
        if size > MAX_GRAMMAR_BYTES:
            raise f.fail(
                constraint.field, f"{size} bytes, over the limit of {MAX_GRAMMAR_BYTES} bytes"
            )
        if "\0" in constraint.source:
            raise f.fail(constraint.field, "must not contain a NUL character")
    return constraint


def _response_format(fmt: Fields) -> OutputConstraint | None:
    kind = fmt.required_str("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return OutputConstraint(kind=kind, source="", field="response_format")
    if kind != "json_schema":
        raise fmt.fail(
            "type", f"must be text, json_object or json_schema, got {_short(repr(kind))}"
        )
    spec = fmt.required_child("json_schema")
    name = spec.str_("name")
    spec.bool_("strict", False)
    schema = spec.object_("schema")
    if schema is None:
        raise spec.fail("schema", "required (a JSON Schema object)")
    # as sent: the order of properties is the order the answer gives them in
    source = json.dumps(schema, ensure_ascii=False)
    return OutputConstraint(
        kind=kind, source=source, field="response_format.json_schema.schema", name=name
    )


def _grammar(g: Fields) -> OutputConstraint:
    kind = g.required_str("type")
    if kind not in ("regex", "lark"):
        raise g.fail("type", f"must be regex or lark, got {_short(repr(kind))}")
    source = g.required_str(kind, nonempty=True)
    return OutputConstraint(kind=kind, source=source, field=f"grammar.{kind}")


TOOL_CHOICES: tuple[str, ...] = ("auto", "none", "required")


def tool_name(tool: Mapping[str, JsonValue]) -> str | None:
    """A tool definition's function name (``_tools`` checked that it has one)."""
    function = tool.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) else None


def _tool_choice(
    f: Fields, tools: tuple[Mapping[str, JsonValue], ...] | None
) -> tuple[str, str | None]:
    """OpenAI's ``tool_choice``: a mode, or ``{"type":"function","function":{"name":…}}``."""
    raw = f.raw("tool_choice")
    if raw is None:
        return "auto", None
    if isinstance(raw, str):
        if raw not in TOOL_CHOICES:
            got = _short(repr(raw))
            raise f.fail("tool_choice", f"must be auto, none, required or a function, got {got}")
        if raw == "required" and not tools:
            raise f.fail("tool_choice", "'required' needs tools")
        return raw, None
    choice = f.child("tool_choice")
    if choice is None:
        raise f.fail("tool_choice", f"must be a string or an object, got {describe(raw)}")
    kind = choice.str_("type")
    if kind is not None and kind != "function":
        raise choice.fail("type", f"must be 'function', got {_short(repr(kind))}")
    name = choice.required_child("function").required_str("name", nonempty=True)
    names = [tool_name(t) for t in tools or ()]
    if name not in names:
        raise f.fail("tool_choice.function.name", f"{_short(repr(name))} is not one of the tools")
    return "function", name


def _progress(f: Fields, rid: RequestId | None) -> bool:
    """``progress``: a boolean, and ``true`` only on an addressed request."""
    progress = f.bool_("progress", False)
    if progress and rid is None:
        raise f.fail(
            "progress",
            "needs an id (a request without one is read to its end as tokens, "
            "so it cannot be sent progress lines)",
        )
    return progress


def _load(f: Fields, rid: RequestId | None) -> Load:
    return Load(
        id=rid,
        path=f.path_("path", required=True) or "",
        adapter_path=f.path_("adapter_path"),
        draft_path=f.path_("draft_path"),
        context_len=f.int_("context_len", minimum=1),
        trust_remote_code=f.bool_("trust_remote_code", False),
        force=f.bool_("force", False),
        progress=_progress(f, rid),
        gpu_layers=f.int_("gpu_layers"),
        parallel_slots=f.int_("parallel_slots"),
        mock=f.object_("mock"),  # type: ignore[arg-type]
    )


def _generate(f: Fields, rid: RequestId | None) -> Generate:
    return Generate(
        id=rid,
        prompt=f.required_str("prompt"),
        sampling=_sampling(f),
        cache_key=f.str_("cache_key", nonempty=True),
        progress=_progress(f, rid),
        constraint=_constraint(f),
        mock=f.object_("mock"),  # type: ignore[arg-type]
    )


def _chat(f: Fields, rid: RequestId | None) -> Chat:
    messages = f.objects("messages", required=True) or []
    if not messages:
        raise f.fail("messages", "must not be empty")
    kwargs = f.object_("chat_template_kwargs")
    tools = _tools(f)
    choice, name = _tool_choice(f, tools)
    return Chat(
        id=rid,
        messages=tuple(_message(m) for m in messages),
        sampling=_sampling(f),
        chat_template_kwargs=kwargs,  # type: ignore[arg-type]
        tools=tools,
        cache_key=f.str_("cache_key", nonempty=True),
        progress=_progress(f, rid),
        constraint=_constraint(f),
        tool_choice=choice,
        tool_name=name,
        mock=f.object_("mock"),  # type: ignore[arg-type]
    )


def _tokenize(f: Fields, rid: RequestId | None) -> Tokenize:
    return Tokenize(
        id=rid,
        text=f.required_str("text"),
        add_special_tokens=f.bool_("add_special_tokens", True),
    )


def _detokenize(f: Fields, rid: RequestId | None) -> Detokenize:
    return Detokenize(id=rid, tokens=f.int_list("tokens", required=True))


def _inspect(f: Fields, rid: RequestId | None) -> Inspect:
    return Inspect(id=rid, prompt=f.required_str("prompt"), dir=f.path_("dir"))


_PARSERS: dict[str, Callable[[Fields, RequestId | None], Request]] = {
    "hello": lambda f, rid: Hello(id=rid),
    "ping": lambda f, rid: Ping(id=rid),
    "load": _load,
    "unload": lambda f, rid: Unload(id=rid),
    "generate": _generate,
    "chat": _chat,
    "info": lambda f, rid: Info(id=rid),
    "tokenize": _tokenize,
    "detokenize": _detokenize,
    "inspect": _inspect,
    "cancel": lambda f, rid: Cancel(id=rid),
    "quit": lambda f, rid: Quit(id=rid),
}
COMMANDS: tuple[str, ...] = tuple(_PARSERS)
# Commands a worker may leave out of hello's ``commands`` (and then refuse
# with invalid_request): a sharded worker cannot ``inspect`` one process's attention.
OPTIONAL_COMMANDS: tuple[str, ...] = ("inspect",)
SAMPLING_OPTIONS: tuple[str, ...] = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "repeat_penalty",
    "repetition_context_size",
    "logit_bias",
    "seed",
    "stop",
    "logprobs",
    "num_draft_tokens",
)

# -- the fields each command knows --------------------------------------------------------

_COMMON = ("cmd", "id")
REQUEST_FIELDS: dict[str, frozenset[str]] = {
    "hello": frozenset(_COMMON),
    "ping": frozenset(_COMMON),
    "load": frozenset(
        (
            *_COMMON,
            "path",
            "adapter_path",
            "draft_path",
            "context_len",
            "trust_remote_code",
            "force",
            "gpu_layers",
            "parallel_slots",
            "progress",
            "mock",
        )
    ),
    "unload": frozenset(_COMMON),
    "generate": frozenset(
        (
            *_COMMON,
            "prompt",
            *SAMPLING_OPTIONS,
            "cache_key",
            "progress",
            "response_format",
            "grammar",
            "mock",
        )
    ),
    "chat": frozenset(
        (
            *_COMMON,
            "messages",
            *SAMPLING_OPTIONS,
            "chat_template_kwargs",
            "tools",
            "tool_choice",
            "cache_key",
            "progress",
            "response_format",
            "grammar",
            "mock",
        )
    ),
    "info": frozenset(_COMMON),
    "tokenize": frozenset((*_COMMON, "text", "add_special_tokens")),
    "detokenize": frozenset((*_COMMON, "tokens")),
    "inspect": frozenset((*_COMMON, "prompt", "dir")),
    "cancel": frozenset(_COMMON),
    "quit": frozenset(_COMMON),
}
MESSAGE_FIELDS = frozenset(("role", "content", "name", "tool_calls", "tool_call_id"))
CONTENT_PART_FIELDS = frozenset(("type", "text", "image_url", "image"))
# ``detail`` is OpenAI's resolution hint; accepted, and not used.
IMAGE_URL_FIELDS = frozenset(("url", "detail"))
