"""Worker overhead against in-process mlx-lm, measured in the same run.

    python bench/worker_bench.py --model DIR [--tries 50] [--out results.json]

Figures (see bench/README.md for the targets):
- decode tokens/s and time to first token: ``python -m bridge`` (timed by the
  host, on receipt of each line) against ``mlx_lm.stream_generate`` in this
  process (timed on each yield), same model, prompt and token count, rounds
  interleaved;
- cancel → terminal line, during decode and during prefill (p50/p99);
- ``hello`` answered after spawn; exit after ``quit`` with a generation in flight.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LONG_TEXT = Path(os.__file__).read_text()


class Pipe:
    """A worker child; every stdout line is stamped with its arrival time."""

    def __init__(self, *args: str) -> None:
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        self.spawned = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            cwd=ROOT,
        )
        self.lines: queue.Queue[tuple[float, dict[str, Any]] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put((time.perf_counter(), json.loads(raw)))
        self.lines.put(None)

    def send(self, request: dict[str, Any]) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        self.proc.stdin.flush()
        return time.perf_counter()

    def next(self, timeout: float = 120) -> tuple[float, dict[str, Any]]:
        item = self.lines.get(timeout=timeout)
        if item is None:
            raise RuntimeError("worker exited")
        return item

    def until_terminal(self) -> list[tuple[float, dict[str, Any]]]:
        out = []
        while True:
            t, line = self.next()
            out.append((t, line))
            if line["type"] != "token":
                return out

    def close(self) -> None:
        try:
            self.send({"cmd": "quit"})
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


def decode_rate(stamps: list[float]) -> float:
    """Tokens per second between the first and the last token."""
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def compare_decode(
    model_dir: str, pipe: Pipe, worker: Any, prompt: str, tokens: int, rounds: int
) -> dict[str, Any]:
    """Rounds interleave in-process, raw pipe and ``supervisor.Worker``."""
    import mlx.core as mx
    import mlx_lm
    from mlx_lm import stream_generate

    model, tokenizer = mlx_lm.load(model_dir)
    ids = tokenizer.encode(prompt)
    ours: dict[str, list[float]] = {"tps": [], "ttft_ms": []}
    theirs: dict[str, list[float]] = {"tps": [], "ttft_ms": []}
    supervised: dict[str, list[float]] = {"tps": [], "ttft_ms": []}
    for r in range(rounds + 1):  # round 0 warms all three up
        started = time.perf_counter()
        stamps = []
        for _ in stream_generate(model, tokenizer, mx.array(ids), max_tokens=tokens):
            stamps.append(time.perf_counter())
        if r:
            theirs["tps"].append(decode_rate(stamps))
            theirs["ttft_ms"].append((stamps[0] - started) * 1000)
        sent = pipe.send({"cmd": "generate", "id": f"d{r}", "prompt": prompt, "max_tokens": tokens})
        lines = pipe.until_terminal()
        stamps = [t for t, line in lines if line["type"] == "token"]
        assert len(stamps) == tokens, lines[-1]
        if r:
            ours["tps"].append(decode_rate(stamps))
            ours["ttft_ms"].append((stamps[0] - sent) * 1000)
        sent = time.perf_counter()
        with worker.generate(prompt, max_tokens=tokens) as stream:
            stamps = [time.perf_counter() for _ in stream]
        assert len(stamps) == tokens, stream.result
        if r:
            supervised["tps"].append(decode_rate(stamps))
            supervised["ttft_ms"].append((stamps[0] - sent) * 1000)
    med = {k: statistics.median(v) for k, v in ours.items()}
    ref = {k: statistics.median(v) for k, v in theirs.items()}
    sup = {k: statistics.median(v) for k, v in supervised.items()}
    return {
        "tokens": tokens,
        "rounds": rounds,
        "worker_tps": med["tps"],
        "in_process_tps": ref["tps"],
        "tps_ratio": med["tps"] / ref["tps"],
        "supervisor_tps": sup["tps"],
        "supervisor_tps_ratio": sup["tps"] / ref["tps"],
        "worker_ttft_ms": med["ttft_ms"],
        "in_process_ttft_ms": ref["ttft_ms"],
        "supervisor_ttft_ms": sup["ttft_ms"],
        "ttft_overhead_ms": med["ttft_ms"] - ref["ttft_ms"],
        "rounds_tps": {
            "worker": ours["tps"],
            "in_process": theirs["tps"],
            "supervisor": supervised["tps"],
        },
    }


def cancel_in_decode(pipe: Pipe, tries: int) -> dict[str, Any]:
    latencies, steps = [], []
    for i in range(tries):
        rid = f"cd{i}"
        pipe.send({"cmd": "generate", "id": rid, "prompt": "x", "max_tokens": 100000})
        stamps = [pipe.next()[0] for _ in range(8)]
        steps.append((stamps[-1] - stamps[0]) / 7)
        sent = pipe.send({"cmd": "cancel", "id": rid})
        lines = pipe.until_terminal()
        assert lines[-1][1]["finish_reason"] == "cancelled"
        latencies.append((lines[-1][0] - sent) * 1000)
    return {
        "tries": tries,
        "p50_ms": pct(latencies, 0.5),
        "p99_ms": pct(latencies, 0.99),
        "decode_step_ms": statistics.median(steps) * 1000,
    }


def cancel_in_prefill(pipe: Pipe, tries: int, prompt_chars: int, step: int) -> dict[str, Any]:
    prompt = LONG_TEXT[:prompt_chars]
    for warm in ("warm", "full"):  # the first long prefill compiles kernels
        pipe.send({"cmd": "generate", "id": warm, "prompt": prompt, "max_tokens": 1})
        done = pipe.until_terminal()[-1][1]
    prompt_tokens = done["prompt_tokens"]
    prefill_s = done["ttft_ms"] / 1000
    chunk_ms = prefill_s * 1000 / max(1, -(-prompt_tokens // step))
    latencies = []
    missed = 0
    while len(latencies) < tries:
        rid = f"cp{len(latencies)}-{missed}"
        pipe.send({"cmd": "generate", "id": rid, "prompt": prompt, "max_tokens": 1})
        time.sleep(random.uniform(0.1, 0.7) * prefill_s)
        sent = pipe.send({"cmd": "cancel", "id": rid})
        lines = pipe.until_terminal()
        if lines[-1][1]["finish_reason"] != "cancelled" or len(lines) > 1:
            missed += 1  # the prefill ended before the cancel arrived: not a prefill cancel
            continue
        latencies.append((lines[-1][0] - sent) * 1000)
    return {
        "missed": missed,
        "tries": tries,
        "prompt_tokens": prompt_tokens,
        "prefill_step_size": step,
        "prefill_ms": prefill_s * 1000,
        "chunk_ms": chunk_ms,
        "p50_ms": pct(latencies, 0.5),
        "p99_ms": pct(latencies, 0.99),
    }


def hello_after_spawn(tries: int) -> dict[str, Any]:
    latencies = []
    for _ in range(tries):
        pipe = Pipe()
        pipe.send({"cmd": "hello", "id": 1})
        t, line = pipe.next()
        assert line["type"] == "hello"
        latencies.append((t - pipe.spawned) * 1000)
        pipe.close()
    return {"tries": tries, "p50_ms": pct(latencies, 0.5), "max_ms": max(latencies)}


def quit_in_flight(model_dir: str, tries: int) -> dict[str, Any]:
    latencies = []
    for _ in range(tries):
        pipe = Pipe()
        pipe.send({"cmd": "load", "id": "l", "path": model_dir})
        pipe.until_terminal()
        pipe.send({"cmd": "generate", "id": "g", "prompt": "x", "max_tokens": 100000})
        pipe.next()
        sent = pipe.send({"cmd": "quit", "id": "q"})
        rc = pipe.proc.wait(10)
        latencies.append((time.perf_counter() - sent) * 1000)
        assert rc == 0
    return {"tries": tries, "p50_ms": pct(latencies, 0.5), "max_ms": max(latencies)}


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True)
    p.add_argument("--tries", type=int, default=50)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--prefill-chars", type=int, default=12000)
    p.add_argument("--prefill-step-size", type=int, default=None)
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    import mlx.core as mx

    from bridge.engines.text.engine import DEFAULT_PREFILL_STEP

    step = args.prefill_step_size or DEFAULT_PREFILL_STEP
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
        "device": str(mx.default_device()),
        "mlx": mx.__version__,
        "model": args.model,
    }
    results["hello"] = hello_after_spawn(10)
    pipe = Pipe("--prefill-step-size", str(step), "--prompt-cache-entries", "0")
    pipe.send({"cmd": "load", "id": "l", "path": args.model})
    results["load"] = pipe.until_terminal()[-1][1]
    sys.path.insert(0, str(ROOT))
    from supervisor import Worker

    # No prompt cache on either worker: every round prefills, as in-process does.
    command = [sys.executable, "-m", "bridge", "--prompt-cache-entries", "0"]
    with Worker(command, model=args.model, cwd=ROOT, env={"HF_HUB_OFFLINE": "1"}) as worker:
        results["decode"] = compare_decode(
            args.model, pipe, worker, "def main():", args.tokens, args.rounds
        )
    results["cancel_decode"] = cancel_in_decode(pipe, args.tries)
    results["cancel_prefill"] = cancel_in_prefill(pipe, args.tries, args.prefill_chars, step)
    pipe.close()
    results["quit_in_flight"] = quit_in_flight(args.model, 10)
    text = json.dumps(results, indent=2)
    sys.stdout.write(text + "\n")
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
