"""Does the host slow a paced worker down? Raw pipe vs ``Worker`` vs ``AsyncWorker``.

For each consumer and each concurrency N (N streams started together):
aggregate tok/s (tokens / (last end - first send)), the host's CPU time per
token (all its threads: reader and consumers), the worker's own
``done.ttft_ms`` and ``done.generation_tps`` (medians: the worker's view, so a
host that stalls the worker shows here), and for the ``stamp`` producer the
delivery latency of each token (worker ``os.write`` -> consumer sees it; the
token text is the writer's ``perf_counter_ns``, a clock shared by processes).

Producers: ``mock`` (``python -m mock_worker`` with ``token_delay`` per step),
``stamp`` (a child writing one token line per stream every ``--delay`` s,
stamped), ``real`` (``python -m bridge`` on ``--model``).

    .venv/bin/python bench/host_overhead.py --producer mock --concurrency 1,8,32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from supervisor import AsyncWorker, Worker  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
PROMPT = "the quick brown fox jumps over the lazy dog"

STAMP = textwrap.dedent(
    """
    import json, os, sys, threading, time
    out = sys.stdout.buffer.fileno()
    lock = threading.Lock()
    def send(obj):
        data = json.dumps(obj, separators=(",", ":")).encode() + b"\\n"
        with lock:
            os.write(out, data)
    pending = []  # [rid, left]
    cond = threading.Condition()
    def engine():
        while True:
            with cond:
                while not pending:
                    cond.wait()
                batch = list(pending)
            time.sleep(DELAY)
            for item in batch:
                rid = item[0]
                send({"type": "token", "id": rid, "token": str(time.perf_counter_ns()),
                      "token_id": 1})
                item[1] -= 1
                if item[1] == 0:
                    with cond:
                        pending.remove(item)
                    send({"type": "done", "id": rid, "done": True, "finish_reason": "length",
                          "tokens_generated": 0, "prompt_tokens": 1, "prompt_tps": 0.0,
                          "generation_tps": 0.0, "ttft_ms": 0.0, "queue_ms": 0.0,
                          "peak_memory_bytes": 0})
    threading.Thread(target=engine, daemon=True).start()
    for raw in sys.stdin.buffer:
        req = json.loads(raw)
        cmd, rid = req["cmd"], req.get("id")
        if cmd == "hello":
            send({"type": "hello", "id": rid, "protocol_version": 1, "versions": {},
                  "commands": [], "sampling_options": [], "limits": {}, "pid": os.getpid()})
        elif cmd == "load":
            send({"type": "loaded", "id": rid, "ok": True, "path": req["path"],
                  "model_type": "stamp", "vocab_size": 1, "layers": 1, "hidden_size": 1,
                  "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 1,
                  "context_len": None, "dtype": "none", "quantization": None,
                  "parameters": 0, "vision": False, "load_ms": 0.0})
        elif cmd == "generate":
            with cond:
                pending.append([rid, req["max_tokens"]])
                cond.notify()
        elif cmd == "quit":
            break
    """
)


def command(args: argparse.Namespace) -> list[str]:
    if args.producer == "mock":
        return [sys.executable, "-m", "mock_worker"]
    if args.producer == "stamp":
        return [sys.executable, "-c", f"DELAY = {args.delay}\n" + STAMP]
    return [sys.executable, "-m", "bridge", "--prompt-cache-entries", "0"]


def model(args: argparse.Namespace) -> str:
    return args.model if args.producer == "real" else "m"


def extra(args: argparse.Namespace) -> dict[str, Any] | None:
    return {"mock": {"token_delay": args.delay}} if args.producer == "mock" else None


def summarize(
    rows: list[dict[str, Any]], first: float, last: float, stamped: bool, cpu: float
) -> dict[str, Any]:
    tokens = sum(r["n"] for r in rows)
    wall = last - first
    out: dict[str, Any] = {
        "tok_s": round(tokens / wall, 1),
        "host_cpu_us_per_token": round((time.process_time() - cpu) * 1e6 / max(1, tokens), 1),
        "done_ttft_ms": _med([r.get("ttft") for r in rows]),
        "done_gen_tps": _med([r.get("gtps") for r in rows]),
    }
    if stamped:
        lat = sorted(x for r in rows for x in r["lat"])
        if lat:
            out["lat_ms_p50"] = round(lat[len(lat) // 2], 3)
            out["lat_ms_p99"] = round(lat[int(len(lat) * 0.99)], 3)
    return out


def _med(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None]
    return round(statistics.median(vals), 2) if vals else None


# -- raw pipe: a reader thread decodes and files lines by id, like bench/batch_bench.py ---


def raw(args: argparse.Namespace, n: int) -> dict[str, Any]:
    proc = subprocess.Popen(
        command(args), stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=ENV, cwd=ROOT
    )
    assert proc.stdin is not None and proc.stdout is not None
    cond = threading.Condition()
    rows: dict[Any, dict[str, Any]] = {}
    ended: set[Any] = set()
    stamped = args.producer == "stamp"

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.perf_counter_ns()
            obj = orjson.loads(line)
            rid = obj.get("id")
            with cond:
                row = rows.setdefault(rid, {"n": 0, "lat": []})
                if obj.get("type") == "token":
                    row["n"] += 1
                    if stamped:
                        row["lat"].append((now - int(obj["token"])) / 1e6)
                else:
                    row["end"] = time.perf_counter()
                    row["ttft"] = obj.get("ttft_ms")
                    row["gtps"] = obj.get("generation_tps")
                    ended.add(rid)
                cond.notify_all()

    threading.Thread(target=read, daemon=True).start()

    def send(*reqs: dict[str, Any]) -> float:
        assert proc.stdin is not None
        t = time.perf_counter()
        proc.stdin.write(b"".join(orjson.dumps(r) + b"\n" for r in reqs))
        proc.stdin.flush()
        return t

    def wait(ids: list[Any]) -> None:
        with cond:
            cond.wait_for(lambda: all(i in ended for i in ids), 600)

    send({"cmd": "hello", "id": "h"}, {"cmd": "load", "id": "l", "path": model(args)})
    wait(["h", "l"])
    results = []
    for r in range(args.rounds + 1):
        ids = [f"r{r}-{i}" for i in range(n)]
        reqs = []
        for i, rid in enumerate(ids):
            req: dict[str, Any] = {
                "cmd": "generate",
                "id": rid,
                "prompt": f"{i} {PROMPT}",
                "max_tokens": args.tokens if r else 8,
                "temperature": 0.0,
            }
            if extra(args):
                req.update(extra(args) or {})
            reqs.append(req)
        cpu = time.process_time()
        sent = send(*reqs)
        wait(ids)
        if r:
            with cond:
                got = [rows[i] for i in ids]
            results.append(summarize(got, sent, max(g["end"] for g in got), stamped, cpu))
    proc.stdin.close()
    proc.wait()
    return _pick(results)


def _pick(results: list[dict[str, Any]]) -> dict[str, Any]:
    results.sort(key=lambda r: r["tok_s"])
    out = dict(results[len(results) // 2])
    out["all_tok_s"] = [r["tok_s"] for r in results]
    return out


# -- Worker: one thread per stream -------------------------------------------------------


def sync(args: argparse.Namespace, n: int) -> dict[str, Any]:
    stamped = args.producer == "stamp"
    results = []
    with Worker(command(args), model=model(args), env=ENV, cwd=ROOT, start_timeout=120) as w:
        for r in range(args.rounds + 1):
            barrier = threading.Barrier(n)
            cpu = time.process_time()
            tokens = args.tokens if r else 8

            def one(i: int, tokens: int = tokens, barrier: threading.Barrier = barrier) -> Any:
                barrier.wait()
                sent = time.perf_counter()
                lat: list[float] = []
                count = 0
                with w.generate(
                    f"{i} {PROMPT}", max_tokens=tokens, temperature=0.0, extra=extra(args)
                ) as s:
                    for tok in s:
                        count += 1
                        if stamped:
                            lat.append((time.perf_counter_ns() - int(tok.text)) / 1e6)
                    res = s.result
                return sent, {
                    "n": count,
                    "lat": lat,
                    "end": time.perf_counter(),
                    "ttft": res.timings.ttft_ms,
                    "gtps": res.timings.generation_tps,
                }

            out: list[Any] = [None] * n

            def run(i: int, out: list[Any] = out) -> None:
                out[i] = one(i)

            threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if r:
                first = min(o[0] for o in out)
                rows = [o[1] for o in out]
                results.append(summarize(rows, first, max(x["end"] for x in rows), stamped, cpu))
    return _pick(results)


# -- AsyncWorker: one task per stream ---------------------------------------------------


def asynchronous(args: argparse.Namespace, n: int) -> dict[str, Any]:
    stamped = args.producer == "stamp"

    async def main() -> list[dict[str, Any]]:
        results = []
        async with AsyncWorker(
            command(args), model=model(args), env=ENV, cwd=ROOT, start_timeout=120
        ) as w:
            for r in range(args.rounds + 1):
                tokens = args.tokens if r else 8
                cpu = time.process_time()

                async def one(i: int, tokens: int = tokens) -> Any:
                    sent = time.perf_counter()
                    lat: list[float] = []
                    count = 0
                    async with w.generate(
                        f"{i} {PROMPT}", max_tokens=tokens, temperature=0.0, extra=extra(args)
                    ) as s:
                        async for tok in s:
                            count += 1
                            if stamped:
                                lat.append((time.perf_counter_ns() - int(tok.text)) / 1e6)
                        res = s.result
                    return sent, {
                        "n": count,
                        "lat": lat,
                        "end": time.perf_counter(),
                        "ttft": res.timings.ttft_ms,
                        "gtps": res.timings.generation_tps,
                    }

                out = await asyncio.gather(*(one(i) for i in range(n)))
                if r:
                    first = min(o[0] for o in out)
                    rows = [o[1] for o in out]
                    last = max(x["end"] for x in rows)
                    results.append(summarize(rows, first, last, stamped, cpu))
        return results

    return _pick(asyncio.run(main()))


CONSUMERS: dict[str, Callable[[argparse.Namespace, int], dict[str, Any]]] = {
    "raw": raw,
    "Worker": sync,
    "AsyncWorker": asynchronous,
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--producer", choices=("mock", "stamp", "real"), default="mock")
    p.add_argument("--model", default="/tmp/demo-sup")
    p.add_argument("--delay", type=float, default=0.003)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--consumers", default=",".join(CONSUMERS))
    args = p.parse_args()
    table: dict[str, Any] = {}
    for n in [int(x) for x in args.concurrency.split(",")]:
        for name in args.consumers.split(","):
            row = CONSUMERS[name](args, n)
            table[f"{name} N={n}"] = row
            sys.stdout.write(f"{args.producer:5} {name:12} N={n:<3} {json.dumps(row)}\n")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
