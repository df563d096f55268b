"""Typed reads from one decoded JSON object, with errors that name the field.

``Fields`` is the only place that turns untyped JSON into Python values; each
method either returns a value of the promised type or raises
:class:`~protocol.errors.InvalidRequest` whose message reads like
``messages[0].content: must be a string or a list``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TypeAlias

from .errors import InvalidRequest, RequestId

JsonValue: TypeAlias = "None | bool | int | float | str | list[JsonValue] | dict[str, JsonValue]"

_MISSING = object()


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

    __slots__ = ("_raw", "_prefix", "_request_id")

    def __init__(
        self,
        raw: Mapping[str, object],
        *,
        prefix: str = "",
        request_id: RequestId | None = None,
    ) -> None:
        self._raw = raw
        self._prefix = prefix
        self._request_id = request_id

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
        return Fields(value, prefix=f"{self.name(key)}.", request_id=self._request_id)

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
        value = self._raw.get(key)
        if value is None:
            return default
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"must be an integer, got {describe(value)}")
        _check_range(self, key, value, minimum, maximum, "an integer")
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

    def int_list(self, key: str, *, required: bool = False, minimum: int = 0) -> tuple[int, ...]:
        out: list[int] = []
        for i, item in enumerate(self.list_(key, required=required) or []):
            if isinstance(item, float) and item.is_integer():
                item = int(item)
            if isinstance(item, bool) or not isinstance(item, int):
                raise self.fail(f"{key}[{i}]", f"must be an integer, got {describe(item)}")
            if item < minimum:
                raise self.fail(f"{key}[{i}]", f"must be ≥ {minimum}")
            out.append(item)
        return tuple(out)


def _check_range(
    fields: Fields,
    key: str,
    value: float,
    minimum: float | None,
    maximum: float | None,
    kind: str,
) -> None:
    if minimum is not None and maximum is not None and not minimum <= value <= maximum:
        raise fields.fail(key, f"must be {kind} from {minimum:g} to {maximum:g}")
    if minimum is not None and value < minimum:
        raise fields.fail(key, f"must be {kind} ≥ {minimum:g}")
    if maximum is not None and value > maximum:
        raise fields.fail(key, f"must be {kind} ≤ {maximum:g}")
