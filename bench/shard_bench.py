"""A sharded worker (``--ranks N``) against one process, through ``supervisor``; and its failures.

    python bench/shard_bench.py MODEL_DIR [--ranks 2] [--backend ring] [--tokens 64]
                                [--concurrency 1,8] [--out FILE]

For each of the two workers (one process, then ``--ranks N``), in the same
run: the load time, single-stream greedy decode tok/s and time to first
token (median of 3), and the aggregate tok/s of K concurrent streams for
each K in ``--concurrency``; then, on the sharded worker, the failure
figures: SIGKILL of rank 1 mid-stream (seconds until the stream raises
``WorkerCrashed`` with the rank; seconds until every rank is gone) and
SIGKILL of rank 0 (seconds until rank 1 is gone). Prints JSON (and writes
it to ``--out`` after every section).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil
from report import emit, save  # this folder, run as a script

from supervisor import Worker, WorkerCrashed

PROMPT = "The history of the printing press begins"


def alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def gone_after(pids: list[int], since: float, limit: float = 30.0) -> float:
    while any(alive(p) for p in pids):
        if time.monotonic() - since > limit:
            return float("inf")
        time.sleep(0.005)
    return time.monotonic() - since


def figures(command: list[str], model: str, tokens: int, concurrency: list[int]) -> dict[str, Any]:
    started = time.perf_counter()
    with Worker(command, model=model, start_timeout=900, request_timeout=900) as w:
        out: dict[str, Any] = {"load_s": round(time.perf_counter() - started, 2)}
        for _ in range(2):  # warm-up
            w.generate(PROMPT, max_tokens=tokens, temperature=0.0).text()
        rates, ttfts = [], []
        for _ in range(3):
            s = w.generate(PROMPT, max_tokens=tokens, temperature=0.0)
            t0 = time.perf_counter()
            n = sum(1 for _ in s)
            rates.append(n / (time.perf_counter() - t0))
            ttft = s.result.timings.ttft_ms
            ttfts.append(ttft if ttft is not None else float("nan"))
        out["single_tok_s"] = round(statistics.median(rates), 1)
        out["ttft_ms"] = round(statistics.median(ttfts), 2)

        def one(i: int) -> int:
            return sum(1 for _ in w.generate(f"{PROMPT} {i}", max_tokens=tokens, temperature=0.0))

        for k in concurrency:
            with ThreadPoolExecutor(k) as pool:
                list(pool.map(one, range(k)))
                t0 = time.perf_counter()
                total = sum(pool.map(one, range(k)))
                out[f"aggregate_tok_s_{k}"] = round(total / (time.perf_counter() - t0), 1)
        return out


def kill_mid_stream(command: list[str], model: str, rank: int) -> dict[str, Any]:
    """SIGKILL ``rank`` while a stream decodes: seconds until the host's
    ``WorkerCrashed`` (and what it said), and until every rank is gone."""
    out: dict[str, Any] = {}
    with Worker(command, model=model, start_timeout=900) as w:
        sharding = w.info().model.sharding
        assert sharding is not None
        pids = [r.pid for r in sharding.ranks]
        it = iter(w.generate(PROMPT, max_tokens=1_000_000))
        next(it)
        with ThreadPoolExecutor(1) as watch:
            killed = time.monotonic()
            os.kill(pids[rank], signal.SIGKILL)
            gone = watch.submit(gone_after, pids, killed)  # from the kill, not after the stream
            try:
                for _ in it:
                    pass
            except WorkerCrashed as exc:
                out["to_error_s"] = round(time.monotonic() - killed, 3)
                out["error"] = {"rank": exc.rank, "exit_code": exc.exit_code}
            out["to_all_gone_s"] = round(gone.result(), 3)
    return out


def failures(command: list[str], model: str) -> dict[str, Any]:
    rank1 = kill_mid_stream(command, model, 1)
    rank0 = kill_mid_stream(command, model, 0)
    return {
        "rank1_kill_to_error_s": rank1.get("to_error_s"),
        "rank1_kill_error": rank1.get("error"),
        "rank1_kill_to_all_gone_s": rank1["to_all_gone_s"],
        "rank0_kill_to_all_gone_s": rank0["to_all_gone_s"],
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--backend", default="ring")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--concurrency", default="1,8")
    p.add_argument("--out")
    args = p.parse_args()
    base = [sys.executable, "-P", "-m", "bridge"]
    sharded = [*base, "--ranks", str(args.ranks), "--backend", args.backend]
    concurrency = [int(k) for k in args.concurrency.split(",") if k]
    result: dict[str, Any] = {"ranks": args.ranks, "backend": args.backend, "tokens": args.tokens}
    result["one_process"] = figures(base, args.model, args.tokens, concurrency)
    save(result, args.out)
    result["sharded"] = figures(sharded, args.model, args.tokens, concurrency)
    save(result, args.out)
    result["failures"] = failures(sharded, args.model)
    save(result, args.out)
    emit(result)


if __name__ == "__main__":
    main()
