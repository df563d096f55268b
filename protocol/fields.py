"""Typed reads from one decoded JSON object, with errors that name the field.

``Fields`` is the only place that turns untyped JSON into Python values; each
method either returns a value of the promised type or raises
:class:`~protocol.errors.InvalidRequest` whose message reads like
``messages[0].content: must be a string or a list``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import TypeAlias

from .errors import InvalidRequest, RequestId

JsonValue: TypeAlias = "None | bool | int | float | str | list[JsonValue] | dict[str, JsonValue]"

# The largest value of a count or size field (``max_tokens``, ``context_len``,
# ``top_k``, token ids, …): MLX indexes with 32-bit integers, and a bound here
# keeps every integer the worker may echo well inside what JSON carries.
MAX_INT32 = 2**31 - 1
MIN_INT32 = -(2**31)
# How deep a request may nest, counting the request object as level 1.
# orjson refuses more than 1024 levels; Python's recursion limit (1000) is
# what a chat template's ``tojson`` or ``json.loads`` of a tool call's
# arguments would hit, so the bound sits far below both.
MAX_JSON_DEPTH = 64


def describe(value: object) -> str:
    """A short JSON type name for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


class Fields:
    """Reads fields of one JSON object; ``prefix`` names it in errors."""

    __slots__ = ("_raw", "_prefix", "_request_id", "_int32")

    def __init__(
        self,
        raw: Mapping[str, object],
        *,
        prefix: str = "",
        request_id: RequestId | None = None,
        int32: bool = False,
    ) -> None:
        """``int32``: integers without an explicit bound must fit in 32 bits
        (requests read this way; see :meth:`int_`)."""
        self._raw = raw
        self._prefix = prefix
        self._request_id = request_id
        self._int32 = int32

    @property
    def request_id(self) -> RequestId | None:
        return self._request_id

    def name(self, key: str) -> str:
        return f"{self._prefix}{key}"

    def fail(self, key: str, problem: str) -> InvalidRequest:
        return InvalidRequest(f"{self.name(key)}: {problem}", request_id=self._request_id)

    def has(self, key: str) -> bool:
        return self._raw.get(key) is not None

    def raw(self, key: str) -> object:
        return self._raw.get(key)

    def nested(self, key: str, value: Mapping[str, object]) -> Fields:
        return Fields(
            value, prefix=f"{self.name(key)}.", request_id=self._request_id, int32=self._int32
        )

    # -- scalars ---------------------------------------------------------------

    def str_(self, key: str, *, required: bool = False, nonempty: bool = False) -> str | None:
        value = self._raw.get(key)
        if value is None:
            if required:
                raise self.fail(key, "required")
            return None
        if not isinstance(value, str):
            raise self.fail(key, f"must be a string, got {describe(value)}")
        if nonempty and not value:
            raise self.fail(key, "must not be empty")
        return value

    def required_str(self, key: str, *, nonempty: bool = False) -> str:
        value = self.str_(key, required=True, nonempty=nonempty)
        assert value is not None
        return value

    def bool_(self, key: str, default: bool) -> bool:
        value = self._raw.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, got {describe(value)}")
        return value

    def int_(
        self,
        key: str,
        default: int | None = None,
        *,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> int | None:
        """An integer; ``5.0`` reads as 5 (JSON Schema's "integer" accepts it).
        With ``int32`` set, a side without an explicit bound is bounded by
        ``MIN_INT32`` or ``MAX_INT32``: in a request, counts and sizes beyond
        32 bits are mistakes, and MLX indexes with 32-bit integers."""
        value = self._raw.get(key)
        if value is None:
            return default
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"must be an integer, got {describe(value)}")
        _check_range(self, key, value, minimum, maximum, "an integer")
        if self._int32 and minimum is None and value < MIN_INT32:
            raise self.fail(key, f"must be an integer ≥ {MIN_INT32}")
        if self._int32 and maximum is None and value > MAX_INT32:
            raise self.fail(key, f"must be an integer ≤ {MAX_INT32}")
        return value

    def number(
        self,
        key: str,
        default: float,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
    ) -> float:
        value = self._raw.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"must be a number, got {describe(value)}")
        try:
            result = float(value)
        except OverflowError:
            result = math.inf
        if not math.isfinite(result):
            raise self.fail(key, "must be a finite number")
        _check_range(self, key, result, minimum, maximum, "a number")
        return result

    # -- containers ------------------------------------------------------------

    def list_(self, key: str, *, required: bool = False) -> list[object] | None:
        value = self._raw.get(key)
        if value is None:
            if required:
                raise self.fail(key, "required")
            return None
        if not isinstance(value, list):
            raise self.fail(key, f"must be a list, got {describe(value)}")
        return value

    def object_(self, key: str) -> dict[str, object] | None:
        value = self._raw.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.fail(key, f"must be an object, got {describe(value)}")
        return value

    def child(self, key: str) -> Fields | None:
        """The object at ``key``, read through its own ``Fields`` (None when absent)."""
        value = self.object_(key)
        return None if value is None else self.nested(key, value)

    def required_child(self, key: str) -> Fields:
        value = self.child(key)
        if value is None:
            raise self.fail(key, "required")
        return value

    def objects(self, key: str, *, required: bool = False) -> list[Fields] | None:
        """A list of objects, each read through its own ``Fields`` named ``key[i]``."""
        items = self.list_(key, required=required)
        if items is None:
            return None
        out: list[Fields] = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise self.fail(f"{key}[{i}]", f"must be an object, got {describe(item)}")
            out.append(self.nested(f"{key}[{i}]", item))
        return out

    def str_list(self, key: str) -> tuple[str, ...]:
        """A string or a list of strings (OpenAI's ``stop`` shape)."""
        value = self._raw.get(key)
        if value is None:
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise self.fail(key, f"must be a string or a list of strings, got {describe(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise self.fail(f"{key}[{i}]", f"must be a string, got {describe(item)}")
            if not item:
                raise self.fail(f"{key}[{i}]", "must not be empty")
        return tuple(value)

    def int_list(
        self, key: str, *, required: bool = False, minimum: int = 0, maximum: int = MAX_INT32
    ) -> tuple[int, ...]:
        """A list of integers written as integers: unlike :meth:`int_`, ``5.0``
        is refused (token ids are never the result of float arithmetic, so a
        float there is a host's bug, not a rounding)."""
        out: list[int] = []
        for i, item in enumerate(self.list_(key, required=required) or []):
            if isinstance(item, bool) or not isinstance(item, int):
                raise self.fail(f"{key}[{i}]", f"must be an integer, got {describe(item)}")
            if not minimum <= item <= maximum:
                raise self.fail(f"{key}[{i}]", f"must be an integer from {minimum} to {maximum}")
            out.append(item)
        return tuple(out)

    def path_(self, key: str, *, required: bool = False) -> str | None:
        """A non-empty string naming a file or directory: no NUL byte, which no
        file system path can hold (``open`` would raise "embedded null byte")."""
        value = self.str_(key, required=required, nonempty=True)
        if value is not None and "\0" in value:
            raise self.fail(key, "must not contain a NUL character")
        return value


def _check_range(
    fields: Fields,
    key: str,
    value: float,
    minimum: float | None,
    maximum: float | None,
    kind: str,
) -> None:
    low, high = _bound(minimum), _bound(maximum)
    if minimum is not None and maximum is not None and not minimum <= value <= maximum:
        raise fields.fail(key, f"must be {kind} from {low} to {high}")
    if minimum is not None and value < minimum:
        raise fields.fail(key, f"must be {kind} ≥ {low}")
    if maximum is not None and value > maximum:
        raise fields.fail(key, f"must be {kind} ≤ {high}")


def _bound(value: float | None) -> str:
    """A range bound as written: integers exactly (``2147483647``, not ``2.14748e+09``)."""
    if value is None or isinstance(value, int):
        return str(value)
    return f"{value:g}"


def too_deep(value: object, limit: int = MAX_JSON_DEPTH, *, path: str = "") -> str | None:
    """The path of the first array or object nested deeper than ``limit``
    levels (``value`` itself is level 1), or None. Iterative, so any depth is
    safe to check; only containers are visited, and a path is spelled out
    only for the one that fails."""
    stack: list[tuple[dict[str, object] | list[object], tuple[str | int, ...]]] = []
    if isinstance(value, dict | list):
        stack.append((value, ()))
    while stack:
        item, keys = stack.pop()
        children = item.items() if isinstance(item, dict) else enumerate(item)
        for key, child in children:
            if isinstance(child, dict | list):
                if len(keys) + 1 >= limit:
                    return _spell(path, (*keys, key))
                stack.append((child, (*keys, key)))
    return None


def _spell(path: str, keys: tuple[str | int, ...]) -> str:
    """``messages[0].content``, and ``logit_bias['5']`` for a key that is not
    a name, as the field readers spell them."""
    out = path
    for key in keys:
        if isinstance(key, int):
            out += f"[{key}]"
        elif not key.isidentifier():
            out += f"[{key!r}]"
        else:
            out += f".{key}" if out else key
    return out


# In JSON text: a string literal (skipped whole) or one bracket.
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]')


def text_too_deep(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``text``, read as JSON, nests arrays and objects deeper than
    ``limit``, without parsing it (it need not be valid JSON)."""
    depth = 0
    for match in _JSON_TOKEN.finditer(text):
        char = match.group()[0]
        if char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth = max(0, depth - 1)
    return False
