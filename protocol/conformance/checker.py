"""Every reply line against the JSON Schema and the protocol's own decoder.

Two independent checks run on each decoded line:

1. **The JSON Schema** (``docs/protocol.schema.json``, draft 2020-12), through
   the ``jsonschema`` package: the line must match ``#/$defs/reply_<type>``
   (replies are closed: an undocumented field fails), or ``#/$defs/reply``
   when its ``type`` is unknown.
2. **The decoder** (:func:`protocol.reply_decode.parse_reply`): every
   required field is there with the right type. This is what runs when no
   schema is available.

Where the schema comes from: ``--schema PATH``, else the repository's
``docs/protocol.schema.json`` next to this package (an editable install or a
checkout), else the copy installed with the package,
``protocol/protocol.schema.json``. ``jsonschema`` is a development dependency of this
project and is imported lazily: without it the kit says so and runs the
decoder checks only. An explicit ``--schema`` without ``jsonschema`` is an
error.
"""

from __future__ import annotations

import importlib
import pathlib
from collections.abc import Mapping
from typing import Any, Final

import orjson

from ..errors import WireError
from ..reply_decode import parse_reply

__all__ = ["DEFAULT_SCHEMA", "KitError", "ReplyChecker", "load_checker"]

_PACKAGE: Final = pathlib.Path(__file__).resolve().parents[1]
# The spec's schema in a checkout; an installed package carries a copy
# (``protocol/protocol.schema.json``, kept identical by tests/protocol/test_schema.py).
CHECKOUT_SCHEMA: Final = _PACKAGE.parent / "docs" / "protocol.schema.json"
PACKAGED_SCHEMA: Final = _PACKAGE / "protocol.schema.json"
DEFAULT_SCHEMA: Final = CHECKOUT_SCHEMA if CHECKOUT_SCHEMA.is_file() else PACKAGED_SCHEMA
_MAX_INLINE_DEPTH: Final = 16
_KNOWN_GOOD_MAX: Final = 8192


class KitError(Exception):
    """The kit cannot run as asked (bad flags, unreadable schema). Exit status 2."""


class ReplyChecker:
    """``problem(line)`` is None for a valid reply line, else what is wrong with it."""

    def __init__(self, schema: Mapping[str, Any] | None, *, description: str) -> None:
        self.schema = schema
        self.description = description
        self._validators: dict[str, Any] = {}
        self._known_good: set[bytes] = set()

    def check(self, raw: bytes, line: object) -> str | None:
        """``problem(line)``, remembering lines already found valid: a stream
        repeats the same token lines, and jsonschema takes ~0.1 ms a line."""
        if raw in self._known_good:
            return None
        found = self.problem(line)
        if found is None:
            if len(self._known_good) >= _KNOWN_GOOD_MAX:
                self._known_good.clear()
            self._known_good.add(raw)
        return found

    def problem(self, line: object) -> str | None:
        if self.schema is not None:
            found = self._schema_problem(line)
            if found is not None:
                return found
        try:
            parse_reply(line)
        except WireError as exc:
            return f"decoder: {exc.message}"
        return None

    def _schema_problem(self, line: object) -> str | None:
        assert self.schema is not None
        tag = line.get("type") if isinstance(line, dict) else None
        name = f"reply_{tag}" if isinstance(tag, str) else "reply"
        if name not in self.schema["$defs"]:
            name = "reply"
        error = self._validator(name).best_match(line)
        if error is None:
            return None
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        return f"schema #/$defs/{name} at {where}: {error.message}"

    def _validator(self, name: str) -> Any:
        validator = self._validators.get(name)
        if validator is None:
            validator = _Validator(self.schema, name)
            self._validators[name] = validator
        return validator


class _Validator:
    """One ``$defs`` entry with its local refs inlined (about twice as fast)."""

    def __init__(self, schema: Any, name: str) -> None:
        jsonschema = importlib.import_module("jsonschema")
        self._best_match = importlib.import_module("jsonschema.exceptions").best_match
        defs = schema["$defs"]
        flat = _inline(defs[name], defs, 0)
        self._impl = jsonschema.Draft202012Validator({**flat, "$defs": defs})

    def best_match(self, line: object) -> Any:
        return self._best_match(self._impl.iter_errors(line))


def _inline(node: Any, defs: Mapping[str, Any], depth: int) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if (
            len(node) == 1
            and isinstance(ref, str)
            and ref.startswith("#/$defs/")
            and depth < _MAX_INLINE_DEPTH
        ):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs, depth + 1)
        return {key: _inline(value, defs, depth) for key, value in node.items()}
    if isinstance(node, list):
        return [_inline(item, defs, depth) for item in node]
    return node


def load_checker(schema_path: pathlib.Path | None) -> ReplyChecker:
    """The checker for ``--schema`` (None: the default location, if present)."""
    explicit = schema_path is not None
    path = schema_path if schema_path is not None else DEFAULT_SCHEMA
    if not path.is_file():
        if explicit:
            raise KitError(f"--schema {path}: no such file")
        return ReplyChecker(
            None,
            description=f"decoder checks only: no schema at {path} (pass --schema PATH)",
        )
    try:
        importlib.import_module("jsonschema")
    except ImportError:
        if explicit:
            raise KitError(
                "--schema needs the jsonschema package: pip install 'jsonschema>=4.21'"
            ) from None
        return ReplyChecker(
            None,
            description="decoder checks only: jsonschema is not installed "
            "(pip install 'jsonschema>=4.21' to check replies against the schema)",
        )
    try:
        schema = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise KitError(f"cannot read the schema {path}: {exc}") from None
    if not isinstance(schema, dict) or not isinstance(schema.get("$defs"), dict):
        raise KitError(f"{path} is not the protocol schema (no $defs)")
    missing = [
        name for name in ("reply", "reply_hello", "reply_error") if name not in schema["$defs"]
    ]
    if missing:
        raise KitError(f"{path} is not the protocol schema (no {', '.join(missing)} in $defs)")
    return ReplyChecker(schema, description=f"{path} + decoder")
