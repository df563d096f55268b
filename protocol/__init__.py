"""The mlx-bridge wire contract: message types, codec, error codes, version.

This package imports nothing else of the project; hosts written in Python
(including :mod:`supervisor`) and the worker (:mod:`bridge`) both build on it.
The prose spec is ``docs/protocol.md``; the JSON Schema is
``docs/protocol.schema.json``.
"""

from .codec import (
    DEFAULT_MAX_LINE_BYTES,
    PROTOCOL_VERSION,
    decode_json,
    decode_request,
    encode,
    encode_wire,
)
from .errors import ERROR_CODES, RequestId, WireError, error_from_code
from .replies import FINISH_REASONS, Reply
from .requests import COMMANDS, MAX_LOGPROBS, OPTIONAL_COMMANDS, SAMPLING_OPTIONS, Request

__all__ = [
    "COMMANDS",
    "OPTIONAL_COMMANDS",
    "DEFAULT_MAX_LINE_BYTES",
    "ERROR_CODES",
    "FINISH_REASONS",
    "MAX_LOGPROBS",
    "PROTOCOL_VERSION",
    "Reply",
    "Request",
    "RequestId",
    "SAMPLING_OPTIONS",
    "WireError",
    "decode_json",
    "decode_request",
    "encode",
    "encode_wire",
    "error_from_code",
]
