"""The long reliability run, outside CI: 100,000+ fuzzed lines and a 10,000-request soak.

It drives the same machinery as tests/reliability (the fuzzed worker and its
invariants, the hypothesis strategies, the field sweep with every hostile
value, the soak through the supervisor) at a size CI cannot afford, and
counts violations instead of stopping at the first. Figures are recorded in
docs/reliability.md.

    .venv/bin/python bench/reliability_long.py --lines 100000 --soak 10000 --out /tmp/long.json

Phases: (1) the field sweep with every hostile value; (2) random batches
(random bytes, random JSON, hostile requests interleaved with cancels and
duplicate ids) until ``--lines`` lines were sent; (3) the soak through
``supervisor.Worker`` (16 threads), and a smaller one through ``AsyncWorker``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from bridge import demo_model  # noqa: E402
from tests.reliability import strategies as fs  # noqa: E402
from tests.reliability.hostile import COMMAND_FIELDS, bases  # noqa: E402
from tests.reliability.soak import soak  # noqa: E402
from tests.reliability.test_sweep import sweep  # noqa: E402
from tests.reliability.wire import FuzzWorker, Stats  # noqa: E402


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def fuzz_phase(
    worker: FuzzWorker, lines: int, seconds: float, samples: dict[str, list[str]]
) -> None:
    batch = st.one_of(
        fs.batches(fs.raw_lines(), max_size=40),
        fs.batches(fs.json_lines(), max_size=40),
        fs.interleaved(),
    )

    @settings(
        max_examples=200,
        deadline=None,
        database=None,
        phases=(Phase.generate,),
        suppress_health_check=list(HealthCheck),
    )
    @given(items=batch)
    def run(items: fs.Batch) -> None:
        for v in worker.exchange(fs.confine(items, str(worker.workdir)), settle_s=5.0):
            kept = samples.setdefault(v.split(":", 1)[0], [])
            if len(kept) < 5:
                kept.append(v[:1500])

    last = started = time.monotonic()
    while worker.stats.lines < lines and time.monotonic() - started < seconds:
        run()
        if time.monotonic() - last > 30:
            last = time.monotonic()
            say(f"  {worker.stats.lines} lines, {dict(worker.stats.violations)}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", type=Path, help="a model directory (default: build the tiny demo model)"
    )
    p.add_argument(
        "--lines", type=int, default=100_000, help="fuzzed lines to send (default 100000)"
    )
    p.add_argument(
        "--soak", type=int, default=10_000, help="soak requests through Worker (default 10000)"
    )
    p.add_argument(
        "--async-soak", type=int, default=2_000, help="soak requests through AsyncWorker"
    )
    p.add_argument(
        "--fuzz-seconds", type=float, default=float("inf"), help="stop fuzzing after this long"
    )
    p.add_argument("--no-sweep", action="store_true", help="skip the field sweep")
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = p.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="mlx-bridge-long-"))
    model = args.model or demo_model.ensure(scratch / "tiny")
    workdir = scratch / "cwd"
    workdir.mkdir()
    fs.set_bases(bases(str(model), str(workdir)))
    figures: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    samples: dict[str, list[str]] = {}
    started = time.perf_counter()
    worker = FuzzWorker(model, workdir)
    try:
        rss_start = worker.rss_bytes
        say("sweep: every field of every command, every hostile value")
        sweep_violations: Counter[str] = Counter()
        for cmd in [] if args.no_sweep else sorted(COMMAND_FIELDS):
            for v in sweep(worker, cmd, everything=True):
                sweep_violations[v.split(":", 1)[0]] += 1
                samples.setdefault(f"sweep {v.split(':', 1)[0]}", []).append(v[:1500])
        figures["sweep"] = {"violations": dict(sweep_violations), **worker.stats.as_dict()}
        say(f"  {figures['sweep']}")
        worker.stats = Stats()  # the fuzz phase's own figures
        rss_start = worker.rss_bytes
        say(f"fuzz: {args.lines} lines")
        fuzz_started = time.perf_counter()
        fuzz_phase(worker, args.lines, args.fuzz_seconds, samples)
        figures["fuzz"] = {
            **worker.stats.as_dict(),
            "worker_rss_start_bytes": rss_start,
            "worker_rss_end_bytes": worker.rss_bytes,
            "duration_s": round(time.perf_counter() - fuzz_started, 1),
        }
    finally:
        worker.close()
    say(f"  {figures['fuzz']}")
    save(args.out, figures, samples)
    for kind, n in (("sync", args.soak), ("async", args.async_soak)):
        if n:
            say(f"soak ({kind}): {n} requests, 16 concurrent, 20% cancelled")
            report = soak(model, requests=n, kind=kind, warmup=max(100, n // 20))
            figures[f"soak_{kind}"] = report.as_dict()
            say(f"  {figures[f'soak_{kind}']}")
            save(args.out, figures, samples)
    figures["duration_s"] = round(time.perf_counter() - started, 1)
    say(save(args.out, figures, samples)[:20000])
    return 0


def save(out: Path | None, figures: dict[str, Any], samples: dict[str, list[str]]) -> str:
    """Write the figures so far (each phase adds its own)."""
    text = json.dumps({**figures, "violation_samples": samples}, indent=2, ensure_ascii=False)
    if out:
        out.write_text(text + "\n")
    return text


if __name__ == "__main__":
    raise SystemExit(main())
