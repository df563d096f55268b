"""``python -m bridge``: the command line of the worker."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from protocol.codec import DEFAULT_MAX_LINE_BYTES

from .server import ServeOptions, serve

DESCRIPTION = """\
mlx-bridge worker: serves MLX language models over stdin/stdout, one JSON
object per line (see docs/protocol.md). Protocol lines go to stdout only;
logs go to stderr. The worker exits on {"cmd":"quit"} or when stdin closes.
"""


def parser(prog: str = "python -m bridge") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    p.add_argument("--model", metavar="PATH", help="load this model at start-up (no reply line)")
    p.add_argument(
        "--log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="stderr log level (default: WARNING)",
    )
    p.add_argument(
        "--max-line-bytes",
        type=_positive,
        default=DEFAULT_MAX_LINE_BYTES,
        metavar="N",
        help=f"longest accepted request line (default: {DEFAULT_MAX_LINE_BYTES})",
    )
    p.add_argument(
        "--max-queue",
        type=_positive,
        default=256,
        metavar="N",
        help="requests that may wait; more are refused with 'busy' (default: 256)",
    )
    return p


def add_engine_options(p: argparse.ArgumentParser) -> None:
    from .mlx_engine import DEFAULT_PREFILL_STEP

    p.add_argument(
        "--prefill-step-size",
        type=_positive,
        default=DEFAULT_PREFILL_STEP,
        metavar="N",
        help=f"prompt tokens per prefill chunk; cancel is checked between chunks "
        f"(default: {DEFAULT_PREFILL_STEP})",
    )
    p.add_argument(
        "--memory-budget",
        type=_positive,
        metavar="BYTES",
        help="memory the load gate may assume is available (default: what psutil reports)",
    )


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be ≥ 1")
    return value


def setup_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr, level=level, format="%(name)s %(levelname)s: %(message)s"
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    add_engine_options(p)
    args = p.parse_args(argv)
    setup_logging(args.log_level)
    from .mlx_engine import MlxLmEngine

    engine = MlxLmEngine(prefill_step_size=args.prefill_step_size, memory_budget=args.memory_budget)
    options = ServeOptions(
        max_line_bytes=args.max_line_bytes, max_queue=args.max_queue, preload=args.model
    )
    return serve(engine, options)
