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
        type=positive_int,
        default=DEFAULT_MAX_LINE_BYTES,
        metavar="N",
        help=f"longest accepted request line (default: {DEFAULT_MAX_LINE_BYTES})",
    )
    p.add_argument(
        "--max-queue",
        type=positive_int,
        default=256,
        metavar="N",
        help="requests that may wait; more are refused with 'busy' (default: 256)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="refuse requests with unknown fields (invalid_request naming the field); "
        "by default they are ignored and their names logged",
    )
    return p


def add_engine_options(p: argparse.ArgumentParser) -> None:
    from .mlx_engine import DEFAULT_PREFILL_STEP
    from .mlx_prompt_cache import DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES

    p.add_argument(
        "--prefill-step-size",
        type=positive_int,
        default=DEFAULT_PREFILL_STEP,
        metavar="N",
        help=f"prompt tokens per prefill chunk; cancel is checked between chunks "
        f"(default: {DEFAULT_PREFILL_STEP})",
    )
    p.add_argument(
        "--memory-budget",
        type=positive_int,
        metavar="BYTES",
        help="memory the load gate may assume is available (default: what psutil reports)",
    )
    p.add_argument(
        "--prompt-cache-entries",
        type=non_negative_int,
        default=DEFAULT_MAX_ENTRIES,
        metavar="N",
        help="conversations whose KV cache is kept for reuse (one per cache_key, plus the "
        f"default slot), least recently used evicted first; 0 turns it off "
        f"(default: {DEFAULT_MAX_ENTRIES})",
    )
    p.add_argument(
        "--prompt-cache-bytes",
        type=non_negative_int,
        default=DEFAULT_MAX_BYTES,
        metavar="BYTES",
        help="most bytes the kept KV caches may hold; 0 turns it off "
        f"(default: {DEFAULT_MAX_BYTES})",
    )


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be ≥ 1")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be ≥ 0")
    return value


def setup_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr, level=level, format="%(name)s %(levelname)s: %(message)s"
    )


def main(argv: Sequence[str] | None = None) -> int:
    # Here, not at the top: mock_worker imports this module for its parser, and
    # the vision options pull in the image and routing code it never uses.
    from .vlm_options import add_vision_options, routing_engine

    p = parser()
    add_engine_options(p)
    add_vision_options(p)
    args = p.parse_args(argv)
    setup_logging(args.log_level)
    from .mlx_engine import MlxLmEngine

    text = MlxLmEngine(
        prefill_step_size=args.prefill_step_size,
        memory_budget=args.memory_budget,
        prompt_cache_entries=args.prompt_cache_entries,
        prompt_cache_bytes=args.prompt_cache_bytes,
    )
    engine = routing_engine(text, args)
    options = ServeOptions(
        max_line_bytes=args.max_line_bytes,
        max_queue=args.max_queue,
        strict=args.strict,
        preload=args.model,
    )
    return serve(engine, options)
