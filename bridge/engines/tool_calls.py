"""Tool calls in both directions: history into the chat template, answers into calls.

Into the template: OpenAI sends a call's ``function.arguments`` as a JSON
text, while chat templates (Qwen's ``tool_call.arguments | tojson``) expect an
object. ``template_tool_calls`` converts them the way mlx-lm's server does,
leaving text that is not JSON as it is.

Out of the answer: the model writes its calls as text between the format's
markers (``<tool_call>…</tool_call>`` for Qwen's JSON calls,
``<|tool_call_start|>[f(x=1)]<|tool_call_end|>`` for the pythonic family).
``ToolCallFormat.of(tokenizer)`` takes the markers and the parser that mlx-lm
chose for the model when it loaded the tokenizer (``mlx_lm/tool_parsers/``,
picked from ``tool_parser_type`` in ``tokenizer_config.json`` or inferred from
the chat template). ``parse_answer`` cuts the answer at the markers, exactly
as mlx-lm's server does (a call without its end marker runs to the end of the
answer; a format without an end marker, like Mistral's, too), and hands each
call's text to the parser.

A call the parser rejects, or one without a function name, stays in the text
as it was written, markers included, and a warning is logged: a malformed
call is never dropped and never fails the request.

Pure functions over strings; nothing here imports MLX.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from bridge.engines.constraints import JSON_OPTIONS
from bridge.engines.engine_protocol import AnswerParser, ParsedAnswer
from protocol.errors import InvalidRequest
from protocol.fields import JsonValue
from protocol.replies import ToolCall
from protocol.requests import Chat, ChatMessage, OutputConstraint, tool_name

log = logging.getLogger("bridge.tool_calls")

Parser = Callable[[str, Any], Any]
"""mlx-lm's ``parse_tool_call(text, tools)``: a call (dict) or a list of them."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolCallFormat:
    start: str
    end: str
    parser: Parser

    @classmethod
    def of(cls, tokenizer: Any) -> ToolCallFormat | None:
        """The format mlx-lm chose for this ``TokenizerWrapper``, or None."""
        parser = getattr(tokenizer, "tool_parser", None)
        start = getattr(tokenizer, "tool_call_start", None)
        if parser is None or not start:
            return None
        return cls(start=start, end=getattr(tokenizer, "tool_call_end", None) or "", parser=parser)


def parse_answer(
    text: str, fmt: ToolCallFormat, tools: Sequence[Mapping[str, JsonValue]] | None = None
) -> ParsedAnswer | None:
    """The tool calls in ``text`` and the text without them; None when there
    are no well-formed calls (the answer is then plain text)."""
    calls: list[ToolCall] = []
    content: list[str] = []
    tool_list = [dict(t) for t in tools] if tools else None
    pos = 0
    while (begin := text.find(fmt.start, pos)) >= 0:
        content.append(text[pos:begin])
        body_at = begin + len(fmt.start)
        end_at = text.find(fmt.end, body_at) if fmt.end else -1
        if end_at < 0:
            body, pos = text[body_at:], len(text)
        else:
            body, pos = text[body_at:end_at], end_at + len(fmt.end)
        parsed = _parse_call(fmt.parser, body, tool_list)
        if parsed is None:
            content.append(text[begin:pos])
        else:
            calls.extend(parsed)
    content.append(text[pos:])
    if not calls:
        return None
    return ParsedAnswer(tool_calls=tuple(calls), content="".join(content).strip())


def tool_format_for(tokenizer: Any, tools: Sequence[object] | None) -> ToolCallFormat | None:
    """The format to parse a chat's answer with: None without tools, and None
    (with a warning) when mlx-lm knows no tool-call format for the model."""
    if not tools:
        return None
    fmt = ToolCallFormat.of(tokenizer)
    if fmt is None:
        log.warning(
            "tools given, but mlx-lm knows no tool-call format for this model; "
            "the answer is returned as text"
        )
    return fmt


def answer_parser(
    fmt: ToolCallFormat | None, tools: Sequence[Mapping[str, JsonValue]] | None
) -> AnswerParser | None:
    """Finds tool calls in a finished answer, when the request declared tools
    and mlx-lm knows the model's tool-call format."""
    if fmt is None:
        return None
    return partial(parse_answer, fmt=fmt, tools=tools)


def offered_tools(request: Chat) -> tuple[Mapping[str, JsonValue], ...] | None:
    """The tools the chat template is given: none with ``tool_choice: "none"``."""
    if request.tool_choice == "none":
        return None
    return request.tools or None


def required_call(
    request: Chat,
    fmt: ToolCallFormat | None,
    specials: Callable[[], Collection[str]] = frozenset,
) -> OutputConstraint | None:
    """For ``tool_choice`` ``required`` (or one named function): a grammar
    that makes the answer exactly one call, in the model's own markers, of
    one of the tools with arguments that validate against its parameters.
    Built for JSON tool calls (``<tool_call>{"name": …, "arguments": …}</tool_call>``,
    mlx-lm's ``json_tools`` parser); another format is ``invalid_request``.
    A marker that is one of the tokenizer's ``specials()`` (added tokens,
    asked for only when a call is required) is named as a token
    (``<tool_call>``), not spelled as text, as llguidance's Lark wants it."""
    if request.tool_choice not in ("required", "function"):
        return None
    rid = request.id
    if request.constraint is not None:
        raise InvalidRequest(
            f"tool_choice: {request.tool_choice!r} constrains the answer itself; "
            "send it without response_format or grammar",
            request_id=rid,
        )
    if fmt is None:
        raise InvalidRequest(
            "tool_choice: mlx-lm knows no tool-call format for this model", request_id=rid
        )
    kind = getattr(fmt.parser, "__module__", "").rsplit(".", 1)[-1]
    if kind != "json_tools" or not fmt.end:
        raise InvalidRequest(
            f"tool_choice: {request.tool_choice!r} is built for JSON tool calls "
            f"(<tool_call>{{...}}</tool_call>); this model's format is {kind}",
            request_id=rid,
        )
    choices = []
    for tool in request.tools or ():
        name = tool_name(tool)
        if request.tool_choice == "function" and name != request.tool_name:
            continue
        function = tool.get("function")
        parameters = function.get("parameters") if isinstance(function, dict) else None
        choices.append(
            {
                "type": "object",
                "properties": {
                    "name": {"const": name},
                    "arguments": parameters if isinstance(parameters, dict) else {"type": "object"},
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = choices[0] if len(choices) == 1 else {"anyOf": choices}
    schema = {**schema, "x-guidance": JSON_OPTIONS}
    added = specials()
    start, end = _marker(fmt.start, added), _marker(fmt.end, added)
    newline = json.dumps("\n")
    grammar = f"start: {start} {newline} call {newline} {end}\ncall: %json {json.dumps(schema)}"
    return OutputConstraint(kind="lark", source=grammar, field="tool_choice")


def _marker(text: str, specials: Collection[str]) -> str:
    if text in specials and text.startswith("<") and text.endswith(">"):
        return text
    return json.dumps(text)


def template_fields(message: ChatMessage) -> dict[str, Any]:
    """A message's fields for the chat template besides ``role`` and
    ``content``, the same for every engine: ``name``, ``tool_calls`` (their
    arguments decoded, :func:`template_tool_calls`) and ``tool_call_id``."""
    out: dict[str, Any] = {}
    if message.name is not None:
        out["name"] = message.name
    if message.tool_calls is not None:
        out["tool_calls"] = template_tool_calls(message.tool_calls)
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def template_tool_calls(tool_calls: Sequence[JsonValue]) -> list[JsonValue]:
    """A message's ``tool_calls`` for the chat template: copies, with each
    ``function.arguments`` JSON text decoded to its value."""
    out: list[JsonValue] = []
    for call in tool_calls:
        if isinstance(call, dict) and isinstance(call.get("function"), dict):
            function = dict(call["function"])  # type: ignore[arg-type]
            arguments = function.get("arguments")
            if isinstance(arguments, str):
                try:
                    function["arguments"] = json.loads(arguments)
                except (ValueError, RecursionError):
                    # not JSON, or nested too deep to decode (the parser bounds
                    # the depth, so only a caller that skipped it gets here):
                    # the template gets the text
                    pass
            call = {**call, "function": function}
        out.append(call)
    return out


def _parse_call(
    parser: Parser, body: str, tools: list[dict[str, JsonValue]] | None
) -> list[ToolCall] | None:
    try:
        parsed = parser(body, tools)
        items = parsed if isinstance(parsed, list) else [parsed]
        calls = [_tool_call(item) for item in items]
        if not calls:
            raise ValueError("no call in the tool-call text")
    except Exception as exc:  # any parser failure: keep the text
        log.warning(
            "malformed tool call kept as text (%s: %s): %.200r", type(exc).__name__, exc, body
        )
        return None
    return calls


def _tool_call(item: object) -> ToolCall:
    if not isinstance(item, dict):
        raise ValueError(f"a tool call must be an object, got {type(item).__name__}")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("a tool call needs a function name")
    arguments = item.get("arguments", item.get("parameters", {}))  # Llama's JSON says parameters
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    call_id = item.get("id")
    if not isinstance(call_id, str) or not call_id:
        call_id = f"call_{uuid.uuid4().hex[:24]}"
    return ToolCall(id=call_id, name=name, arguments=arguments)
