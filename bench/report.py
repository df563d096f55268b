"""What the benches share: their figures written as they go, and the median of paired rounds."""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Sequence
from typing import Any


def save(result: dict[str, Any], out: str | None) -> None:
    """Rewrite ``out`` (when given) with ``result``: called after every
    section, so that a run cut short keeps what it measured."""
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)


def emit(result: dict[str, Any]) -> None:
    """The result, as one JSON line on stdout."""
    sys.stdout.write(json.dumps(result) + "\n")


def median_ratio(
    rounds: Sequence[dict[str, Any]], mode: str, base: str, key: str = "tok_s"
) -> float:
    """The median over ``rounds`` of ``mode``'s ``key`` over ``base``'s, to 3 places."""
    return round(statistics.median(r[mode][key] / r[base][key] for r in rounds), 3)
