"""Bytes <-> messages. The only module that calls the JSON library.

Framing: one UTF-8 JSON object per ``\\n``-terminated line. ``decode_request``
turns a line (without or with its newline) into a typed request or raises a
:class:`~protocol.errors.WireError`; ``encode`` turns a reply into one line,
and ``encode_or_error`` into one line whatever the reply holds: a reply that
cannot be encoded (an integer beyond 64 bits) becomes an ``internal`` error
line for its id, so a request's terminal line can never be lost.
``TokenLines`` is the streaming fast path: the same bytes as ``encode`` of a
plain :class:`~protocol.replies.TokenEvent`, without building one per token.
"""

from __future__ import annotations

import re

import orjson

from .errors import Internal, InvalidJson, RequestId, WireError
from .fields import JsonValue
from .replies import ErrorReply, Reply
from .requests import Request, parse_request_checked, parse_request_id

PROTOCOL_VERSION = 1
DEFAULT_MAX_LINE_BYTES = 64 * 1024 * 1024


def decode_json(line: bytes) -> object:
    """Parse one line as JSON, with a precise message for each failure."""
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as bad:
            raise InvalidJson(
                f"line is not valid UTF-8 (byte 0x{line[bad.start]:02x} at offset {bad.start})"
            ) from None
        raise InvalidJson(f"line is not valid JSON: {exc}") from None


def decode_request(line: bytes, *, strict: bool = False) -> Request:
    """Decode one request line. Errors carry the request's id when it was readable.
    Unknown fields are ignored, or with ``strict`` refused."""
    return decode_request_checked(line, strict=strict)[0]


def decode_request_checked(line: bytes, *, strict: bool = False) -> tuple[Request, tuple[str, ...]]:
    """``decode_request``, and the paths of the unknown fields it ignored."""
    raw = decode_json(line)
    try:
        return parse_request_checked(raw, strict=strict)
    except WireError as exc:
        if exc.request_id is None and isinstance(raw, dict):
            try:
                exc.request_id = parse_request_id(raw)
            except WireError:
                pass
        raise


def encode_wire(obj: dict[str, JsonValue]) -> bytes:
    """One JSON line (with ``\\n``). Strings orjson rejects (lone surrogates)
    are written with replacement characters rather than lost."""
    try:
        return orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE)
    except orjson.JSONEncodeError:
        return orjson.dumps(_scrub(obj), option=orjson.OPT_APPEND_NEWLINE)


# Python strings hold surrogates only unpaired (a pair is one code point).
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _scrub(value: JsonValue) -> JsonValue:
    """Replace lone surrogates, which UTF-8 cannot carry, with U+FFFD."""
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    if isinstance(value, dict):
        return {_LONE_SURROGATE.sub("\ufffd", k): _scrub(v) for k, v in value.items()}
    return value


class Unencodable(Internal):
    """A reply that JSON cannot carry (orjson: "Integer exceeds 64-bit range")."""


def encode(reply: Reply) -> bytes:
    """One line for ``reply``; raises :class:`Unencodable` (carrying the
    reply's id) when it holds a value JSON cannot carry."""
    try:
        return encode_wire(reply.to_wire())
    except Exception as exc:  # orjson's JSONEncodeError, or a bug in a to_wire
        raise Unencodable(
            f"the {type(reply).__name__} reply could not be encoded: {type(exc).__name__}: {exc}",
            request_id=reply.id,
        ) from exc


def encode_or_error(reply: Reply) -> tuple[bytes, bool]:
    """The line for ``reply`` and True, or, when ``reply`` cannot be encoded,
    an ``internal`` error line for its id and False. The error line is
    terminal: a caller that gets False must treat the request as ended."""
    try:
        return encode(reply), True
    except Unencodable as exc:
        return encode_wire(ErrorReply.of(exc).to_wire()), False


class TokenLines:
    """Encodes the plain token lines (no logprobs) of one request.

    ``lines(text, token_id)`` returns exactly ``encode(TokenEvent(id=...,
    token=text, token_id=token_id))``, at a fraction of the cost: one dict
    is kept and refilled for every token, so an instance belongs to one
    thread (the engine thread streaming that request).
    """

    __slots__ = ("_wire",)

    def __init__(self, request_id: RequestId | None) -> None:
        wire: dict[str, JsonValue] = {"type": "token"}
        if request_id is not None:
            wire["id"] = request_id
        wire["token"] = ""
        wire["token_id"] = 0
        self._wire = wire

    def __call__(self, text: str, token_id: int) -> bytes:
        wire = self._wire
        wire["token"] = text
        wire["token_id"] = token_id
        try:
            return orjson.dumps(wire, option=orjson.OPT_APPEND_NEWLINE)
        except orjson.JSONEncodeError:  # a lone surrogate in the text
            return orjson.dumps(_scrub(wire), option=orjson.OPT_APPEND_NEWLINE)
