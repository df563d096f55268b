"""Where a constrained decode step's time goes (in process, the worker's own decoder).

    python bench/structured_profile.py MODEL_DIR [--rows 8] [--steps 120] [--rounds 5] [--profile]

Steps the text decoder with ROWS sequences plain, then constrained by the
bench's nested schema (masked by the batch's one mask after each row's
first step, :mod:`bridge.engines.text.batch_mask`), then constrained with
every row kept on its own processor (``per_row``: the hand-over turned
off), by turns (each mode first in turn), ROUNDS times, and times the
constraint's parts; the rate is plain's median step over the mode's, per
round. Constrained answers that end are checked (``valid`` of
``structured_bench``; with its schema, answers run to ``max_tokens``, so
none usually ends).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from typing import Any

from report import emit  # this folder, run as a script
from structured_bench import FORMAT, valid

import bridge.engines.constraints as constraints
import bridge.engines.text.batch_mask as batch_mask
from bridge.engines.engine_protocol import Decoded, no_report
from bridge.engines.text.engine import MlxLmEngine
from bridge.model_dir.files import open_model
from protocol.requests import Generate, Load, parse_request

TIMES: dict[str, list[float]] = {}


ANSWERS: dict[str, int] = {}
PER_ROW = False


class Timed(constraints.ConstraintProcessor):
    def __call__(self, context: Any, logits: Any) -> Any:
        if PER_ROW:
            self.hand_over = None  # the row keeps its own processor
        t0 = time.perf_counter()
        out = super().__call__(context, logits)
        TIMES.setdefault("processor_call", []).append(time.perf_counter() - t0)
        return out


VARIANT = "overlap"


class TimedMasks(batch_mask.BatchMasks):
    """The batch mask, timed, with other versions to compare against its own
    (``overlap``): ``read_first`` reads the step's input tokens before the
    forward pass is queued and queues pass, mask and sampling in one go;
    ``serial`` queues the pass, then reads the tokens behind it;
    ``seq_fill`` fills the rows' bitmasks one by one (no llguidance
    executor); ``const_mask`` uploads the bitmask once and applies that one
    at every step, and ``no_mask`` applies none (both for timing only: their
    answers do not follow the grammar)."""

    def apply(self, x: Any, logits: Any, rows: Any) -> Any:
        import mlx.core as mx

        t0 = time.perf_counter()
        vocab = logits.shape[-1]
        if VARIANT in ("overlap", "seq_fill"):
            out = super().apply(x, logits, rows)
        elif VARIANT == "read_first":
            out = constraints.masked(logits, self.advance(READ[0], rows, vocab))
        elif VARIANT == "serial":
            mx.async_eval(logits)  # type: ignore[no-untyped-call]
            out = constraints.masked(logits, self.advance(x.reshape(-1, 1).tolist(), rows, vocab))
        else:
            mx.async_eval(logits)  # type: ignore[no-untyped-call]
            bitmask = self.advance(x.tolist(), rows, vocab)
            if VARIANT == "no_mask":
                out = logits
            else:
                if CONST[0] is None or CONST[0].shape != bitmask.shape:
                    CONST[0] = mx.array(bitmask)
                out = constraints.masked(logits, CONST[0])
        TIMES.setdefault("batch_mask", []).append(time.perf_counter() - t0)
        return out

    def advance(self, tokens: Any, rows: Any, vocab: int) -> Any:
        if VARIANT != "seq_fill":
            return super().advance(tokens, rows, vocab)
        import llguidance.numpy as lln
        import numpy as np

        for i, c in rows:
            c.consume(tokens[i])
        bitmask = np.full(lln.get_bitmask_shape(len(tokens), vocab), -1, np.int32)
        for i, c in rows:
            lln.fill_next_token_bitmask(c.matcher, bitmask, i)
        return bitmask


CONST: list[Any] = [None]
READ: list[Any] = [None]


class VariantModel(batch_mask.MaskedModel):
    def __call__(self, x: Any, cache: Any = None, **kwargs: Any) -> Any:
        rows = self._masks.rows(x, cache)
        if not rows or VARIANT not in ("read_first", "serial"):
            return super().__call__(x, cache, **kwargs)
        if VARIANT == "read_first":
            READ[0] = x.tolist()
        return self._masks.apply(x, self._model(x, cache=cache, **kwargs), rows)


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
    texts = [""] * rows
    for _ in range(n + 10):
        t0 = time.perf_counter()
        events = decoder.step()
        out.append(time.perf_counter() - t0)
        for e in events:
            if isinstance(e, Decoded) and isinstance(e.seq, int):
                texts[e.seq] += e.step.text
                if constrained and e.step.finish_reason == "stop":
                    ANSWERS["stopped"] = ANSWERS.get("stopped", 0) + 1
                    ANSWERS["valid"] = ANSWERS.get("valid", 0) + valid(texts[e.seq])
    decoder.close()
    return out[10:]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="cProfile the last round (stderr)")
    p.add_argument(
        "--variants",
        default="",
        help="also any of: read_first,serial,seq_fill,const_mask,no_mask (TimedMasks)",
    )
    args = p.parse_args()

    def timed(self: constraints.Compiled, prompt: int) -> Timed:
        return Timed(self, prompt)

    constraints.Compiled.processor = timed  # type: ignore[method-assign,assignment]
    import bridge.engines.text.decoder as decoder_module

    decoder_module.BatchMasks = TimedMasks  # type: ignore[misc]
    decoder_module.MaskedModel = VariantModel  # type: ignore[misc]
    engine = MlxLmEngine()
    engine.warm_up()
    engine.load_checked(Load(path=args.model), open_model(args.model), no_report)
    modes = {
        "plain": (False, False, "overlap"),
        "constrained": (True, False, "overlap"),
        "per_row": (True, True, "overlap"),
    }
    for variant in args.variants.split(",") if args.variants else ():
        modes[variant] = (True, False, variant)
    passes: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    global PER_ROW, VARIANT
    steps(engine, args.rows, 20, True)  # warm-up: every kernel of all three compiled once
    for r in range(args.rounds):
        k = r % len(modes)
        order = list(modes)[k:] + list(modes)[:k]  # each mode first in turn
        for mode in order:
            constrained, per_row, VARIANT = modes[mode]
            TIMES.clear()
            ANSWERS.clear()
            PER_ROW = per_row
            profile = cProfile.Profile() if args.profile and r == args.rounds - 1 else None
            if profile is not None:
                profile.enable()
            s = steps(engine, args.rows, args.steps, constrained)
            if profile is not None:
                profile.disable()
                sys.stderr.write(f"-- {mode}\n")
                pstats.Stats(profile, stream=sys.stderr).sort_stats("tottime").print_stats(12)
            figures: dict[str, Any] = {
                "step_ms_median": round(statistics.median(s) * 1000, 3),
                "step_ms_mean": round(statistics.fmean(s) * 1000, 3),
                **ANSWERS,
            }
            for k, v in TIMES.items():
                figures[k + "_ms_per_step"] = round(sum(v) * 1000 / len(s), 3)
            passes[mode].append(figures)
    result: dict[str, Any] = {"rows": args.rows, "steps": args.steps, "passes": passes}
    for mode in list(modes)[1:]:
        rates = [
            p["step_ms_median"] / c["step_ms_median"]
            for p, c in zip(passes["plain"], passes[mode], strict=True)
        ]
        result[mode + "_rate_vs_plain"] = [round(x, 3) for x in rates]
        result[mode + "_rate_vs_plain_median"] = round(statistics.median(rates), 3)
    emit(result)


if __name__ == "__main__":
    main()
