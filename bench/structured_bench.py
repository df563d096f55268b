"""Constrained decoding (``response_format`` json_schema) against the same requests unconstrained.

    python bench/structured_bench.py MODEL_DIR [--concurrency 1,8] [--max-tokens 256]
                                     [--rounds 3] [--out FILE]

One worker (``supervisor.Worker``), greedy, distinct prompts; for each N
and each round, N concurrent requests unconstrained and then the same N
constrained by a nested JSON Schema, by turns (so both see the same moment
of a noisy machine). Reports aggregate tok/s (generated tokens over wall
time) for each, the slowdown, and for the constrained answers how many
ended with ``stop`` and how many of those validate. Prints JSON; ``--out``
is rewritten after every N.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from report import burst_arguments, emit, median_ratio, save  # this folder, run as a script

from supervisor import Worker

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 24},
        "items": {
            "type": "array",
            # long enough that every answer runs to max_tokens, as the plain ones do
            "minItems": 40,
            "maxItems": 40,
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 0, "maximum": 99999},
                    "label": {"type": "string", "maxLength": 16},
                    "tags": {
                        "type": "array",
                        "items": {"enum": ["red", "green", "blue", "none"]},
                        "maxItems": 3,
                    },
                    "ok": {"type": "boolean"},
                },
                "required": ["id", "label", "tags", "ok"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["title", "items"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "listing", "schema": SCHEMA}}


def valid(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    try:
        import jsonschema
    except ImportError:
        return isinstance(value, dict)
    try:
        jsonschema.validate(value, SCHEMA)
    except jsonschema.ValidationError:
        return False
    return True


def batch(w: Worker, n: int, max_tokens: int, constrained: bool) -> dict[str, Any]:
    def one(i: int) -> tuple[int, str, str]:
        extra = {"response_format": FORMAT} if constrained else None
        s = w.generate(f"Listing {i}: ", max_tokens=max_tokens, temperature=0.0, extra=extra)
        text = s.text()
        return s.result.usage.completion_tokens, s.result.finish_reason, text

    with ThreadPoolExecutor(n) as pool:
        started = time.perf_counter()
        results = list(pool.map(one, range(n)))
        seconds = time.perf_counter() - started
    tokens = sum(r[0] for r in results)
    out: dict[str, Any] = {"tok_s": round(tokens / seconds, 1), "tokens": tokens}
    if constrained:
        stopped = [r for r in results if r[1] == "stop"]
        out["stopped"] = len(stopped)
        out["valid"] = sum(1 for r in stopped if valid(r[2]))
    return out


def main() -> None:
    args = burst_arguments(concurrency="1,8", max_tokens=256)
    result: dict[str, Any] = {"max_tokens": args.max_tokens}
    with Worker(model=args.model, start_timeout=900, request_timeout=900) as w:
        batch(w, 2, 32, False)  # warm-up
        batch(w, 2, 32, True)
        for n in args.concurrency:
            rounds = []
            for _ in range(args.rounds):
                plain = batch(w, n, args.max_tokens, False)
                constrained = batch(w, n, args.max_tokens, True)
                rounds.append({"plain": plain, "constrained": constrained})
            ratio = median_ratio(rounds, "constrained", "plain")
            result[f"n{n}"] = {"rounds": rounds, "constrained_over_plain": ratio}
            save(result, args.out)
    emit(result)


if __name__ == "__main__":
    main()
