"""``python -m bridge``: the command line of the worker."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import protocol
from bridge.arguments import existing_directory, non_negative_int, positive_int
from bridge.engines.engine_protocol import DEFAULT_MAX_CONCURRENCY
from bridge.loop.server import ServeOptions, serve
from protocol.codec import DEFAULT_MAX_LINE_BYTES

DESCRIPTION = """\
mlx-bridge worker: serves MLX language models over stdin/stdout, one JSON
object per line. Protocol lines go to stdout only; logs go to stderr. The
worker exits on {"cmd":"quit"}, when stdin closes, or on SIGTERM/SIGINT.
Start with {"cmd":"hello","id":1}: its reply lists the commands and limits.
"""


def epilog() -> str:
    """Where the protocol is written down, for a checkout and for an install."""
    schema = os.path.join(os.path.dirname(protocol.__file__), "protocol.schema.json")
    return (
        "The protocol: docs/protocol.md in the mlx-bridge source (prose, one example per "
        f"message); its JSON Schema is installed as {schema}."
    )


def prog_name(module: str) -> str:
    """``mlx-bridge`` when run as a console script, ``python -m bridge`` otherwise."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if not name or name in ("__main__.py", "-c") or name.endswith(".py"):
        return f"python -m {module}"
    return name


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog or prog_name("bridge"), description=DESCRIPTION, epilog=epilog()
    )
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
        "--max-concurrency",
        type=positive_int,
        default=DEFAULT_MAX_CONCURRENCY,
        metavar="N",
        help="addressed generate/chat requests decoded together in one batch; more wait "
        f"in the queue (default: {DEFAULT_MAX_CONCURRENCY}, see docs/benchmarks.md)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="refuse requests with unknown fields (invalid_request naming the field); "
        "by default they are ignored and their names logged",
    )
    return p


def add_engine_options(p: argparse.ArgumentParser) -> None:
    from bridge.engines.context_limits import DEFAULT_MAX_PROMPT_TOKENS
    from bridge.engines.text.engine import DEFAULT_PREFILL_STEP
    from bridge.engines.text.prompt_cache import DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES

    p.add_argument(
        "--prefill-step-size",
        type=positive_int,
        default=DEFAULT_PREFILL_STEP,
        metavar="N",
        help="prompt tokens per prefill chunk; one chunk runs between two decode steps of "
        "the batch, so it bounds the other streams' stall while a prompt is admitted and "
        f"how long a cancel waits in prefill (default: {DEFAULT_PREFILL_STEP})",
    )
    p.add_argument(
        "--cudnn-attention",
        action="store_true",
        help="on MLX's CUDA build, run attention through cuDNN: faster long prefills, but "
        "50-100 ms to build a graph for each new (query, key) length pair; off by default, "
        "and MLX_CUDA_USE_CUDNN_SDPA in the environment overrides both",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help='let a load that asks for it ("trust_remote_code": true) run Python code '
        "from the model directory (auto_map, model_file); without this flag such a load "
        "is refused with forbidden, and no code from a model directory ever runs "
        "(default: off)",
    )
    p.add_argument(
        "--memory-budget",
        type=positive_int,
        metavar="BYTES",
        help="memory the load gate may assume is available (default: what psutil reports)",
    )
    p.add_argument(
        "--model-root",
        type=existing_directory,
        metavar="DIR",
        help="confine load: path and adapter_path must resolve inside DIR (relative paths "
        "are taken from it; '..', symlinks leaving it, non-directories and repo ids cached "
        "outside it are refused with 'forbidden'); see docs/security.md "
        "(default: no confinement)",
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
    p.add_argument(
        "--max-prompt-tokens",
        type=non_negative_int,
        default=DEFAULT_MAX_PROMPT_TOKENS,
        metavar="N",
        help="most prompt tokens one generate or chat may have (the model's context "
        "limits it too); longer is context_length_exceeded; 0: no cap beyond the context "
        f"(default: {DEFAULT_MAX_PROMPT_TOKENS})",
    )


def setup_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr, level=level, format="%(name)s %(levelname)s: %(message)s"
    )


def main(argv: Sequence[str] | None = None) -> int:
    # Here, not at the top: mock_worker imports this module for its parser, and
    # the vision options pull in the image and routing code it never uses.
    from bridge.engines.vision.options import add_vision_options, routing_engine
    from bridge.shard.launch import add_shard_options, run_sharded

    p = parser()
    add_engine_options(p)
    add_vision_options(p)
    add_shard_options(p)
    args = p.parse_args(argv)
    setup_logging(args.log_level)
    from bridge.engines.mlx.cuda_attention import choose_cudnn_attention

    choose_cudnn_attention(args.cudnn_attention)  # before the engine thread imports MLX
    from bridge.engines.text.engine import MlxLmEngine

    engine_options: dict[str, Any] = {
        "prefill_step_size": args.prefill_step_size,
        "memory_budget": args.memory_budget,
        "prompt_cache_entries": args.prompt_cache_entries,
        "prompt_cache_bytes": args.prompt_cache_bytes,
        "trust_remote_code": args.trust_remote_code,
        "max_prompt_tokens": args.max_prompt_tokens or None,
        "max_concurrency": args.max_concurrency,
    }
    options = ServeOptions(
        max_line_bytes=args.max_line_bytes,
        max_queue=args.max_queue,
        strict=args.strict,
        preload=args.model,
        max_prompt_tokens=args.max_prompt_tokens or None,
        max_concurrency=args.max_concurrency,
        prefill_chunk_tokens=args.prefill_step_size,
    )
    if args.ranks > 1:
        return run_sharded(
            p,
            args,
            engine_options,
            options,
            lambda text, no_vision: routing_engine(text, args, require_vision=no_vision),
        )
    return serve(routing_engine(MlxLmEngine(**engine_options), args), options)


def script() -> NoReturn:
    """The ``mlx-bridge`` console script: ``main``, then exit at once.

    Every protocol line is already written (unbuffered, ``os.write``). The
    interpreter's teardown is skipped: freeing a large model and the GPU
    context there takes about a second, and a host waiting on ``quit``
    should not.
    """
    code = main()
    logging.shutdown()
    os._exit(code)
