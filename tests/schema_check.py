"""Check wire messages against ``docs/protocol.schema.json``.

Importable by any test: ``validate_reply(obj)`` for every line a worker
writes, ``validate_request(obj)`` for every line a host sends. Both raise
``AssertionError`` with the path and problem of the first violation.

A message is checked against the definition its discriminator names
(``#/$defs/reply_<type>``, ``#/$defs/request_<cmd>``), which gives precise
messages, and then against the schema's entry point, so that the
discriminated union itself is exercised too.
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

SCHEMA_PATH = pathlib.Path(__file__).resolve().parents[1] / "docs" / "protocol.schema.json"


@functools.cache
def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return loaded


@functools.cache
def _validator(definition: str) -> Draft202012Validator:
    """A validator for one ``$defs`` entry, resolving refs within the whole schema."""
    root = schema()
    if definition not in root["$defs"]:
        raise KeyError(definition)
    entry = {key: value for key, value in root.items() if key != "oneOf"}
    return Draft202012Validator({**entry, "$ref": f"#/$defs/{definition}"})


def _check(obj: object, kind: str, discriminator: str) -> None:
    if not isinstance(obj, dict):
        raise AssertionError(f"{kind} must be a JSON object, got {type(obj).__name__}: {obj!r}")
    tag = obj.get(discriminator)
    specific = f"{kind}_{tag}" if isinstance(tag, str) else None
    names = [kind]
    if specific is not None and specific in schema()["$defs"]:
        names.insert(0, specific)
    for name in names:
        error = best_match(_validator(name).iter_errors(obj))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
            raise AssertionError(
                f"{kind} does not match #/$defs/{name} at {where}: {error.message}\n"
                f"  {kind}: {json.dumps(obj, ensure_ascii=False)[:2000]}"
            )


def validate_reply(obj: object) -> None:
    """Assert that ``obj`` (one decoded output line) is a valid reply."""
    _check(obj, "reply", "type")


def validate_request(obj: object) -> None:
    """Assert that ``obj`` (one decoded input line) is a valid request."""
    _check(obj, "request", "cmd")
