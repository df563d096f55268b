"""Expected reply lines as patterns: ``{"type": "error", "code": "invalid_json", "id": ABSENT}``.

A pattern lists the fields that matter; fields it does not name may hold
anything (the schema has already checked them). A value is compared as JSON:
``1``, ``1.0`` and ``true`` are three different values, so an integer id
echoed as a float, or as a string, does not match. Special values:

- ``ABSENT``: the field must not be there (a legacy reply has no ``id``);
- ``StartsWith("max_tokens: ")``: a string with that prefix (error messages
  start with the field's path);
- ``Check("a list of integers", predicate)``: anything the predicate accepts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

__all__ = ["ABSENT", "Check", "StartsWith", "mismatches", "same_json"]


class _Absent:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<absent>"


ABSENT: Final = _Absent()


@dataclass(frozen=True, slots=True)
class StartsWith:
    prefix: str

    def __repr__(self) -> str:
        return f"a string starting with {self.prefix!r}"


@dataclass(frozen=True, slots=True)
class Check:
    description: str
    predicate: Callable[[object], bool]

    def __repr__(self) -> str:
        return self.description


def same_json(a: object, b: object) -> bool:
    """Equality as JSON values: booleans, integers and floats never mix."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    return a == b


def mismatches(pattern: Mapping[str, object], line: Mapping[str, object]) -> list[str]:
    """What in ``line`` differs from ``pattern``, one phrase per field."""
    problems: list[str] = []
    for key, expected in pattern.items():
        if isinstance(expected, _Absent):
            if key in line:
                problems.append(f"{key} should be absent, got {line[key]!r}")
            continue
        if key not in line:
            problems.append(f"{key} is missing (expected {expected!r})")
            continue
        actual = line[key]
        if isinstance(expected, StartsWith):
            ok = isinstance(actual, str) and actual.startswith(expected.prefix)
        elif isinstance(expected, Check):
            ok = expected.predicate(actual)
        else:
            ok = same_json(expected, actual)
        if not ok:
            problems.append(f"{key} should be {expected!r}, got {actual!r}")
    return problems
