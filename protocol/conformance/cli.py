"""``python -m protocol.conformance [OPTIONS] -- WORKER COMMAND...``

Exit status: 0 when no case failed (skips allowed), 1 when one did, 2 for a
bad command line or an unreadable ``--schema``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
import tempfile
import time
from collections.abc import Sequence

from .cases import GROUPS
from .checker import KitError, load_checker
from .fixture import choose_model
from .process import imports_from_cwd, worker_command
from .report import Report
from .runner import RunConfig, run
from .table import Group

__all__ = ["main", "parser"]

DESCRIPTION = """\
Drive a worker command through the mlx-bridge protocol's conformance cases
(both dialects, every command, cancel in each phase, bad input, quit and end
of input) and check every reply line against the JSON Schema and the spec's
rules. Prints a pass/fail table; exits 1 if any case failed.
"""

EPILOG = """\
examples:
  .venv/bin/python -m protocol.conformance -- python -m bridge
  .venv/bin/python -m protocol.conformance --model ~/models/tiny -- python -m mock_worker
  .venv/bin/python -m protocol.conformance --only cancel -- ./my-worker --flag

A worker command that starts with a bare `python` or `python3` runs with the
kit's own interpreter (activated venv or not), and its `-m MODULE` as
`-P -m MODULE`, so files in the working directory cannot shadow the module;
the table's header shows the command as run. Any other command runs as given.

Without --model, the kit builds the tiny fixture model with
`python -m bridge.demo_model` into a temporary directory; if it cannot, the
cases that need a model are skipped (loudly). The worker inherits the
environment, with HF_HUB_OFFLINE=1 unless set.
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m protocol.conformance",
        usage="%(prog)s [OPTIONS] -- WORKER COMMAND...",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", metavar="PATH", help="the model path sent in load requests")
    p.add_argument(
        "--schema",
        metavar="PATH",
        type=pathlib.Path,
        help="the protocol's JSON Schema (default: docs/protocol.schema.json of this checkout)",
    )
    p.add_argument(
        "--timeout",
        metavar="S",
        type=_positive,
        default=30.0,
        help="seconds each case, and each worker's start-up and load, may take"
        " (30; raise it for a large model)",
    )
    p.add_argument(
        "--only",
        metavar="TEXT",
        action="append",
        default=[],
        help="run only the cases whose 'group / case' contains TEXT (repeatable)",
    )
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    return p


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def select(groups: Sequence[Group], only: Sequence[str]) -> list[Group]:
    if not only:
        return list(groups)
    wanted = [text.lower() for text in only]
    chosen = []
    for group in groups:
        cases = tuple(
            c for c in group.cases if any(w in f"{group.name} / {c.name}".lower() for w in wanted)
        )
        if cases:
            chosen.append(dataclasses.replace(group, cases=cases))
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if "--" in args_in:
        cut = args_in.index("--")
        options, command = args_in[:cut], args_in[cut + 1 :]
    else:
        options, command = args_in, []
    p = parser()
    args = p.parse_args(options)
    out = sys.stdout
    if args.list:
        for group in GROUPS:
            out.write(f"{group.name}: {group.about}{' (loads the model)' if group.model else ''}\n")
            out.writelines(f"  {case.name}\n" for case in group.cases)
        return 0
    if not command:
        p.error("give the worker command after --, for example: -- python -m bridge")
    command = list(worker_command(command))
    if imports_from_cwd(command):
        sys.stderr.write(
            f"{p.prog}: note: {command[0]} -m imports from the working directory first, so a "
            "bridge.py or protocol.py there would run instead; add -P (Python 3.11+) or run "
            "the console script (mlx-bridge)\n"
        )
    groups = select(GROUPS, args.only)
    if not groups:
        p.error(f"--only {args.only} matches no case (see --list)")
    try:
        checker = load_checker(args.schema)
    except KitError as exc:
        sys.stderr.write(f"{p.prog}: error: {exc}\n")
        return 2
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mlx-bridge-conformance-") as scratch_dir:
        scratch = pathlib.Path(scratch_dir)
        model = choose_model(
            args.model, scratch, env=env, needed=any(group.model for group in groups)
        )
        report = Report(out, groups)
        report.header(command, schema=checker.description, model=model.path, model_note=model.note)
        if model.path is None and any(group.model for group in groups):
            skipped = sum(len(g.cases) for g in groups if g.model)
            sys.stderr.write(
                f"\n*** SKIPPING {skipped} cases that need a model: {model.note} ***\n\n"
            )
        config = RunConfig(
            command=command,
            env=env,
            checker=checker,
            model_path=model.path,
            model_note=model.note,
            scratch=scratch,
            timeout=args.timeout,
        )
        try:
            results = run(groups, config, report.row)
        except KeyboardInterrupt:
            sys.stderr.write("\ninterrupted; the worker was killed\n")
            return 130
        report.summary(results, time.monotonic() - start)
    return 1 if any(result.status == "FAIL" for result in results) else 0
