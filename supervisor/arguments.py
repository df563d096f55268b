"""Checks of the host's arguments, before anything is sent or spawned.

Every public method of ``Worker`` and ``AsyncWorker`` (and their
constructors) passes its arguments through here or through
:func:`supervisor.commands.checked`, so a bad one raises
:class:`~supervisor.errors.InvalidArgument` naming it, never a bare
``TypeError`` from deep inside, and never a request line the worker would
refuse (or, worse, misread: ``orjson`` writes NaN as ``null``).

:func:`json_value` makes a request's values into the JSON the worker will
read: tuples become lists and mappings dicts, and anything JSON cannot carry
exactly is refused: a non-finite float, an integer outside 64 bits, a key
that is not a string, nesting deeper than 255 levels, any other type.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Mapping

from protocol.fields import JsonValue

from .errors import InvalidArgument

__all__ = ["MAX_DEPTH", "json_value", "path", "seconds", "whole"]

MAX_DEPTH = 255
"""The deepest nesting the JSON encoder writes."""
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1


def _kind(value: object) -> str:
    return type(value).__name__


def json_value(value: object, name: str, depth: int = 0) -> JsonValue:
    """``value`` as plain JSON data; ``name`` is its path for errors
    (``messages[0].content``)."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise InvalidArgument(
                f"{name}: an integer of {value.bit_length()} bits does not fit in 64 bits"
            )
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidArgument(f"{name}: must be a finite number, got {value!r}")
        return value
    if depth >= MAX_DEPTH:
        raise InvalidArgument(f"{name}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, list | tuple):
        return [json_value(item, f"{name}[{i}]", depth + 1) for i, item in enumerate(value)]
    if isinstance(value, Mapping):
        out: dict[str, JsonValue] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidArgument(f"{name}: keys must be strings, got {key!r}")
            out[key] = json_value(item, f"{name}.{key}" if name else key, depth + 1)
        return out
    raise InvalidArgument(f"{name}: {_kind(value)} is not JSON data")


def path(name: str, value: object) -> str:
    """A path argument (``str`` or ``os.PathLike[str]``) as a string."""
    try:
        text = os.fspath(value)  # type: ignore[call-overload]
    except TypeError:
        raise InvalidArgument(
            f"{name}: must be a path (str or os.PathLike), got {_kind(value)}"
        ) from None
    if not isinstance(text, str):
        raise InvalidArgument(f"{name}: must be a text path, not bytes")
    if "\0" in text:
        raise InvalidArgument(f"{name}: a path must not contain a NUL byte")
    if not text:
        raise InvalidArgument(f"{name}: must not be empty")
    return text


def seconds(name: str, value: object, *, none_ok: bool, positive: bool = False) -> float | None:
    """A duration in seconds: a finite real number ≥ 0 (> 0 with ``positive``)
    that a thread can wait for; None too with ``none_ok`` (no limit)."""
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        what = "a number of seconds" + (" or None" if none_ok else "")
        raise InvalidArgument(f"{name}: must be {what}, got {_kind(value)}")
    if not math.isfinite(value) or value > threading.TIMEOUT_MAX:
        hint = "; None means no limit" if none_ok else ""
        raise InvalidArgument(
            f"{name}: must be a finite number of seconds up to {threading.TIMEOUT_MAX:g}, "
            f"got {value!r}{hint}"
        )
    if value < 0 or (positive and value == 0):
        raise InvalidArgument(f"{name}: must be {'>' if positive else '≥'} 0, got {value!r}")
    return float(value)


def whole(name: str, value: object, *, minimum: int, none_ok: bool = False) -> int | None:
    """An integer (not a bool) ≥ ``minimum``; None too with ``none_ok``."""
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{name}: must be an integer, got {_kind(value)}")
    if value < minimum:
        raise InvalidArgument(f"{name}: must be ≥ {minimum}, got {value}")
    return value
