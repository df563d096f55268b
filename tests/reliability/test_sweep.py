"""Every field of every queued command, with every hostile value.

For each (command, field, value) one request is sent, all of a command's
through one worker in batches. The spec's rules decide what must be refused
(``invalid_request`` naming the field: a wrong type, a value out of the
documented range, a missing required field); everything else may be accepted
or refused with any other code. Nothing may be answered ``internal``, every
request gets exactly one terminal line, and the worker keeps serving.
"""

from __future__ import annotations

import pytest

from tests.reliability.hostile import (
    COMMAND_FIELDS,
    HOSTILE,
    LOGIT_BIAS_KEYS,
    bases,
    encode,
    must_refuse,
    put,
    values_for,
)
from tests.reliability.profile import LONG
from tests.reliability.wire import FuzzWorker, raise_violations

pytestmark = pytest.mark.timeout(0 if LONG else 300)  # the long profile runs for hours

# Every request here is short (max_tokens 1, or an EOS forced by logit_bias):
# one that runs this long after its batch was sent is a fault.
SETTLE_S = 20.0
BATCH = {"load": 10}  # a load that loses its reply (issue 9 #5) takes its batch down with it


def sweep(fuzz: FuzzWorker, cmd: str, *, everything: bool = LONG) -> list[str]:
    """Send every hostile value in every field of ``cmd``; the violations seen."""
    base = bases(str(fuzz.model), str(fuzz.workdir))
    lines: list[bytes] = []
    refusals: dict[object, str] = {}
    for spec in COMMAND_FIELDS[cmd]:
        for name, value in values_for(spec, everything=everything):
            rid = f"{cmd} {spec.name}={name}"
            request = put(spec.base or base[cmd], spec.path, value)
            request["id"] = rid
            lines.append(encode(request))
            if must_refuse(spec, value):
                refusals[rid] = spec.name
    if cmd == "generate":
        for key, refused in LOGIT_BIAS_KEYS:
            rid = f"generate logit_bias key {key!r}"
            lines.append(encode({**base[cmd], "id": rid, "logit_bias": {key: 1.0}}))
            if refused:
                refusals[rid] = f"logit_bias[{key!r}]"
    size = BATCH.get(cmd, 100)
    violations: list[str] = []
    for start in range(0, len(lines), size):
        violations += fuzz.exchange(
            lines[start : start + size], refusals=refusals, settle_s=SETTLE_S, bounded=True
        )
    return violations


@pytest.mark.parametrize("cmd", sorted(COMMAND_FIELDS))
def test_every_field_with_every_hostile_value(fuzz: FuzzWorker, cmd: str) -> None:
    raise_violations(sweep(fuzz, cmd))


def test_every_hostile_id(fuzz: FuzzWorker) -> None:
    """Readable ids are echoed with their JSON type; unreadable ones get an id-less error."""
    lines = [
        encode({"cmd": cmd, "id": value}) for cmd in ("ping", "tokenize") for _, value in HOSTILE
    ]
    raise_violations(fuzz.exchange(lines))


def test_line_lengths_at_the_limit(fuzz: FuzzWorker) -> None:
    """The limit counts the line without its ending, and ``\\r\\n`` is a line ending."""
    head = b'{"cmd":"ping","id":"edge","pad":"'
    limit = fuzz.max_line_bytes
    lines = []
    for size in (limit - 1, limit, limit + 1, limit + 2):
        for end in (b"\n", b"\r\n"):
            lines.append(head + b"a" * (size - len(head) - 2) + b'"}' + end)
    violations = fuzz.exchange(lines, settle_s=5)
    sizes = sorted(
        t["error"].split(" bytes")[0] for t in fuzz.replies if t.get("code") == "line_too_long"
    )
    if sizes != [f"line of {n}" for n in (limit + 1, limit + 1, limit + 2, limit + 2)]:
        violations.append(f"line_too_long must give the size without the line ending: {sizes}")
    raise_violations(violations)
