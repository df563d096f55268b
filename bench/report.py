"""What the benches share: arguments, figures written as they go, medians of paired rounds."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from typing import Any


def burst_arguments(*, concurrency: str, max_tokens: int) -> argparse.Namespace:
    """``MODEL [--concurrency N,N…] [--max-tokens N] [--rounds N] [--out FILE]``
    for a bench of N requests at once, by turns; ``concurrency`` comes back
    as a list of ints."""
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--concurrency", default=concurrency)
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args()
    args.concurrency = [int(k) for k in args.concurrency.split(",") if k]
    return args


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
