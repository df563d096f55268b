"""Token events per second through ``Worker`` and ``AsyncWorker``, against the raw pipe.

Two producers, each run once per consumer:

- ``mock``: ``python -m mock_worker`` at full speed (no token delay): the real
  request loop, so its own per-token cost bounds every consumer;
- ``firehose``: a minimal child that answers ``hello`` and writes pre-encoded
  token lines as fast as the pipe takes them: the ceiling of the host side.

Consumers: ``raw-lines`` (read lines from a buffered pipe, no decoding),
``raw-json`` (the same plus ``orjson.loads`` per line: what any host must do),
``Worker`` and ``AsyncWorker``. Also measured: how long after the worker's
death the supervisor reports it (``os.kill`` to ``WorkerCrashed``), and how
long ``close()`` of an idle worker takes.

Run from the repository root::

    .venv/bin/python bench/supervisor_throughput.py [--tokens N] [--repeat R] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from supervisor import AsyncWorker, Worker, WorkerCrashed  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
PROMPT = "the quick brown fox jumps over the lazy dog"

FIREHOSE = textwrap.dedent(
    """
    import json, os, sys
    out = sys.stdout.buffer.fileno()
    def send(obj):
        os.write(out, json.dumps(obj).encode() + b"\\n")
    for raw in sys.stdin.buffer:
        req = json.loads(raw)
        cmd, rid = req["cmd"], req.get("id")
        if cmd == "hello":
            send({"type": "hello", "id": rid, "protocol_version": 1, "versions": {},
                  "commands": [], "sampling_options": [], "limits": {}, "pid": os.getpid()})
        elif cmd == "load":
            send({"type": "loaded", "id": rid, "ok": True, "path": req["path"],
                  "model_type": "firehose", "vocab_size": 1, "layers": 1, "hidden_size": 1,
                  "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 1,
                  "context_len": None, "dtype": "none", "quantization": None,
                  "parameters": 0, "vision": False, "load_ms": 0.0})
        elif cmd == "generate":
            n = req["max_tokens"]
            line = json.dumps({"type": "token", "id": rid, "token": " fox",
                               "token_id": 1234}, separators=(",", ":")).encode() + b"\\n"
            block = line * 1024
            for _ in range(n // 1024):
                os.write(out, block)
            os.write(out, line * (n % 1024))
            send({"type": "done", "id": rid, "done": True, "finish_reason": "length",
                  "tokens_generated": n, "prompt_tokens": 1, "prompt_tps": 0.0,
                  "generation_tps": 0.0, "ttft_ms": 0.0, "queue_ms": 0.0,
                  "peak_memory_bytes": 0})
        elif cmd == "quit":
            break
    """
)
PRODUCERS: dict[str, list[str]] = {
    "mock": [sys.executable, "-m", "mock_worker"],
    "firehose": [sys.executable, "-c", FIREHOSE],
}


def raw(command: Sequence[str], tokens: int, *, decode: bool) -> float:
    """Events/s reading the pipe by hand."""
    proc = subprocess.Popen(
        list(command),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=ENV,
        cwd=ROOT,
        bufsize=0,
    )
    assert proc.stdin is not None and proc.stdout is not None
    out = io.BufferedReader(proc.stdout, 1 << 18)  # type: ignore[type-var]
    proc.stdin.write(b'{"cmd":"load","id":1,"path":"m"}\n')
    out.readline()
    request = {"cmd": "generate", "id": 2, "prompt": PROMPT, "max_tokens": tokens}
    proc.stdin.write(orjson.dumps(request) + b"\n")
    started = time.perf_counter()
    n = 0
    if decode:
        for line in out:
            if orjson.loads(line)["type"] != "token":
                break
            n += 1
    else:
        for line in out:
            if not line.startswith(b'{"type":"token"'):
                break
            n += 1
    elapsed = time.perf_counter() - started
    proc.stdin.close()
    proc.wait()
    out.close()
    assert n == tokens, n
    return n / elapsed


def through_worker(command: Sequence[str], tokens: int) -> float:
    with Worker(command, model="m", env=ENV, cwd=ROOT) as w:
        started = time.perf_counter()
        n = sum(1 for _ in w.generate(PROMPT, max_tokens=tokens))
        elapsed = time.perf_counter() - started
    assert n == tokens, n
    return n / elapsed


def through_async_worker(command: Sequence[str], tokens: int) -> float:
    async def main() -> float:
        async with AsyncWorker(command, model="m", env=ENV, cwd=ROOT) as w:
            started = time.perf_counter()
            n = 0
            async for _ in w.generate(PROMPT, max_tokens=tokens):
                n += 1
            elapsed = time.perf_counter() - started
        assert n == tokens, n
        return n / elapsed

    return asyncio.run(main())


CONSUMERS: dict[str, Callable[[Sequence[str], int], float]] = {
    "raw-lines": lambda c, n: raw(c, n, decode=False),
    "raw-json": lambda c, n: raw(c, n, decode=True),
    "Worker": through_worker,
    "AsyncWorker": through_async_worker,
}


def crash_latency_ms(tries: int) -> list[float]:
    """os.kill(SIGKILL) of a streaming worker to WorkerCrashed in the host."""
    out = []
    command = [*PRODUCERS["mock"], "--token-delay", "0.001"]
    for _ in range(tries):
        with Worker(command, model="m", env=ENV, cwd=ROOT) as w:
            stream = w.generate(PROMPT, max_tokens=10**9)
            next(stream)
            os.kill(w.pid, signal.SIGKILL)
            killed = time.perf_counter()
            try:
                for _ in stream:
                    pass
            except WorkerCrashed:
                out.append((time.perf_counter() - killed) * 1000)
    return out


def idle_close_ms(tries: int) -> list[float]:
    out = []
    for _ in range(tries):
        w = Worker(PRODUCERS["mock"], model="m", env=ENV, cwd=ROOT)
        w.ping()
        started = time.perf_counter()
        w.close()
        out.append((time.perf_counter() - started) * 1000)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=200_000, help="tokens per run")
    p.add_argument("--repeat", type=int, default=5, help="runs per cell (best is kept)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    logging.getLogger("supervisor").setLevel(logging.CRITICAL)  # the kills below are expected

    # Round robin over the cells, keeping each cell's best run, so that load
    # from elsewhere on the machine spreads over all cells alike.
    results = {producer: dict.fromkeys(CONSUMERS, 0.0) for producer in PRODUCERS}
    for _ in range(args.repeat):
        for producer, command in PRODUCERS.items():
            for consumer, run in CONSUMERS.items():
                rate = run(command, args.tokens)
                results[producer][consumer] = max(results[producer][consumer], rate)
    crashes = crash_latency_ms(20)
    closes = idle_close_ms(10)
    report = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, {platform.platform()}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "tokens_per_run": args.tokens,
        "events_per_s": results,
        "crash_noticed_ms": {
            "median": statistics.median(crashes),
            "max": max(crashes),
        },
        "idle_close_ms": {"median": statistics.median(closes), "max": max(closes)},
    }
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return 0
    lines = [f"{report['machine']}, {report['date']}, {args.tokens} tokens per run", ""]
    lines.append(f"{'producer':<10} {'consumer':<12} {'events/s':>12} {'vs raw-json':>12}")
    for producer, row in results.items():
        base = row["raw-json"]
        for consumer, rate in row.items():
            lines.append(f"{producer:<10} {consumer:<12} {rate:>12,.0f} {rate / base:>11.2f}x")
    c, d = report["crash_noticed_ms"], report["idle_close_ms"]
    lines.append("")
    lines.append(f"crash noticed: median {c['median']:.1f} ms, max {c['max']:.1f} ms (20 kills)")
    lines.append(f"idle close():  median {d['median']:.1f} ms, max {d['max']:.1f} ms (10 closes)")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
