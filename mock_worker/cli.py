"""``python -m mock_worker``: the real request loop over the scripted engine.

The common flags come from :func:`bridge.cli.parser`; the fault flags set
process-wide defaults that a request's ``mock`` object overrides.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time
from collections.abc import Sequence
from typing import NoReturn

from bridge.arguments import existing_directory
from bridge.cli import parser as bridge_parser
from bridge.cli import prog_name, setup_logging
from bridge.loop.server import ServeOptions, serve
from protocol.errors import ERROR_CODES
from protocol.requests import Quit

from .engine import ScriptedEngine
from .faults import Faults, block_forever, flood_stderr

log = logging.getLogger("mock_worker")

DESCRIPTION = """\
mlx-bridge mock worker: the worker's protocol and request loop over a scripted
engine that echoes the prompt's words as tokens. No MLX. Faults are injected
by the flags below (process-wide defaults) or per request by a "mock" object
on load, generate and chat (see mock_worker/README.md in the mlx-bridge
source). Run it as mlx-bridge-mock or python -P -m mock_worker.
"""

_SUFFIXES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parser() -> argparse.ArgumentParser:
    p = bridge_parser(prog=prog_name("mock_worker"))
    p.description = DESCRIPTION
    w = p.add_argument_group(
        "the worker's security flags (so that a host starts the mock as it starts the worker)"
    )
    w.add_argument(
        "--trust-remote-code",
        action="store_true",
        help='without it, a load with "trust_remote_code": true is forbidden, as in the worker',
    )
    w.add_argument(
        "--model-root",
        type=existing_directory,
        metavar="DIR",
        help="a load path outside DIR is forbidden, as in the worker (the mock reads no files)",
    )
    w.add_argument(
        "--image-root",
        action="append",
        type=existing_directory,
        default=[],
        metavar="DIR",
        help="accepted and checked to be a directory; the mock model has no vision, so "
        "image parts are vision_not_supported anyway",
    )
    g = p.add_argument_group("faults")
    g.add_argument(
        "--token-delay",
        type=_seconds,
        default=0.0,
        metavar="S",
        help="sleep S seconds before each token (one sleep per step of the batch)",
    )
    g.add_argument(
        "--hello-delay",
        type=_seconds,
        default=0.0,
        metavar="S",
        help="wait S seconds before reading any request",
    )
    g.add_argument(
        "--load-delay", type=_seconds, default=0.0, metavar="S", help="each load takes S seconds"
    )
    g.add_argument(
        "--eos-after",
        type=_count,
        metavar="K",
        help="end each generation with EOS (finish_reason stop) after K tokens",
    )
    g.add_argument(
        "--crash-after",
        type=_count,
        metavar="K",
        help="exit at once (code --exit-code) after K tokens of a generation",
    )
    g.add_argument(
        "--exit-code",
        type=_exit_code,
        default=1,
        metavar="N",
        help="exit code of --crash-after (default: 1)",
    )
    g.add_argument(
        "--hang-after",
        type=_count,
        metavar="K",
        help="after K tokens of a generation, the engine hangs: nothing more is written "
        "for it, nor for the others in the batch",
    )
    g.add_argument(
        "--garbage-after",
        type=_count,
        metavar="K",
        help="after K tokens, write one non-JSON line, then go on",
    )
    g.add_argument(
        "--stderr-flood",
        type=_size,
        default=0,
        metavar="BYTES",
        help="write BYTES of log lines to stderr at start-up (suffixes K, M, G)",
    )
    g.add_argument(
        "--fail-load",
        choices=ERROR_CODES,
        metavar="CODE",
        help="every load fails with this error code",
    )
    g.add_argument(
        "--ignore-cancel",
        action="store_true",
        help="a cancelled generation never finishes (and stalls the batch)",
    )
    g.add_argument(
        "--quit-silently",
        action="store_true",
        help="on quit or end of stdin, exit 0 at once: no terminal lines, no bye",
    )
    g.add_argument(
        "--ignore-quit",
        action="store_true",
        help="on quit or end of stdin, stop reading but never exit",
    )
    g.add_argument(
        "--ignore-sigterm",
        action="store_true",
        help="ignore SIGTERM (only SIGKILL ends the worker)",
    )
    return p


def faults_from(args: argparse.Namespace) -> Faults:
    """The process-wide defaults (``--stderr-flood`` is a start-up action, not one)."""
    return Faults(
        token_delay=args.token_delay,
        load_delay=args.load_delay,
        eos_after=args.eos_after,
        crash_after=args.crash_after,
        exit_code=args.exit_code,
        hang_after=args.hang_after,
        garbage_after=args.garbage_after,
        fail_load=args.fail_load,
        ignore_cancel=args.ignore_cancel,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging(args.log_level)
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.stderr_flood:
        flood_stderr(args.stderr_flood)
    if args.hello_delay:
        time.sleep(args.hello_delay)
    engine = ScriptedEngine(
        faults=faults_from(args),
        trust_remote_code=args.trust_remote_code,
        model_root=args.model_root,
        max_concurrency=args.max_concurrency,
    )
    options = ServeOptions(
        max_line_bytes=args.max_line_bytes,
        max_queue=args.max_queue,
        strict=args.strict,
        preload=args.model,
        max_concurrency=args.max_concurrency,
        versions=(),
        optional_versions=(),
    )
    on_quit = None
    if args.quit_silently:
        on_quit = _exit_silently
    elif args.ignore_quit:
        on_quit = _ignore_quit
    return serve(engine, options, on_writer=engine.attach_output, on_quit=on_quit)


def _exit_silently(request: Quit | None) -> NoReturn:
    log.warning("mock fault: quit_silently; exiting 0 without replying")
    logging.shutdown()
    os._exit(0)


def _ignore_quit(request: Quit | None) -> NoReturn:
    block_forever("ignore_quit: no longer reading stdin, and not exiting")


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError("must be a number of seconds ≥ 0")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be an integer ≥ 0")
    return value


def _exit_code(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 255:
        raise argparse.ArgumentTypeError("must be an exit code from 0 to 255")
    return value


def _size(text: str) -> int:
    """Bytes, with an optional K/M/G suffix (powers of 1024)."""
    factor = _SUFFIXES.get(text[-1:].lower(), 1)
    digits = text[:-1] if factor > 1 else text
    try:
        value = int(digits) * factor
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be ≥ 0")
    return value
