"""Where a constrained decode step's time goes (in process, the worker's own decoder).

    python bench/structured_profile.py MODEL_DIR [--rows 8] [--steps 120]

Steps the text decoder with ROWS sequences plain, then constrained by the
bench's nested schema, and times the constraint processor's parts.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from typing import Any

from structured_bench import FORMAT  # this folder, run as a script

import bridge.engines.constraints as constraints
from bridge.engines.engine_protocol import no_report
from bridge.engines.text.engine import MlxLmEngine
from bridge.model_dir.files import open_model
from protocol.requests import Generate, Load, parse_request

TIMES: dict[str, list[float]] = {}


class Timed(constraints.ConstraintProcessor):
    def __call__(self, context: Any, logits: Any) -> Any:
        t0 = time.perf_counter()
        out = super().__call__(context, logits)
        TIMES.setdefault("processor_call", []).append(time.perf_counter() - t0)
        return out


def steps(engine: MlxLmEngine, rows: int, n: int, constrained: bool) -> list[float]:
    decoder = engine.decoder()
    for i in range(rows):
        fields: dict[str, Any] = {
            "cmd": "generate",
            "id": i,
            "prompt": f"Listing {i}: ",
            "max_tokens": n + 50,
        }
        if constrained:
            fields["response_format"] = FORMAT
        request = parse_request(fields)
        assert isinstance(request, Generate)
        decoder.add(i, engine.prepare(request), should_abort=lambda: False)
    out = []
    for _ in range(n + 10):
        t0 = time.perf_counter()
        decoder.step()
        out.append(time.perf_counter() - t0)
    decoder.close()
    return out[10:]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--steps", type=int, default=120)
    args = p.parse_args()

    def timed(self: constraints.Compiled, prompt: int) -> Timed:
        return Timed(self, prompt)

    constraints.Compiled.processor = timed  # type: ignore[method-assign,assignment]
    engine = MlxLmEngine()
    engine.warm_up()
    engine.load_checked(Load(path=args.model), open_model(args.model), no_report)
    result: dict[str, Any] = {}
    for label, constrained in (
        ("plain", False),
        ("constrained", True),
        ("plain2", False),
        ("constrained2", True),
    ):
        TIMES.clear()
        profile = cProfile.Profile()
        profile.enable()
        s = steps(engine, args.rows, args.steps, constrained)
        profile.disable()
        if label == "constrained2":
            pstats.Stats(profile, stream=sys.stderr).sort_stats("tottime").print_stats(14)
        result[label] = {"step_ms_median": round(statistics.median(s) * 1000, 3)}
        for k, v in TIMES.items():
            result[label][k + "_ms_median"] = round(statistics.median(v) * 1000, 3)
            result[label][k + "_ms_per_step"] = round(sum(v) * 1000 / len(s), 3)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
