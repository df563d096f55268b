"""A pool of workers against one worker: aggregate tok/s through ``supervisor``, one run.

    python bench/pool_bench.py MODEL_DIR

One ``Worker`` and then a ``WorkerPool(members=2)`` on the same machine, 8 and
16 concurrent streams (threads) of 64 greedy tokens each, one warm-up round
each. Prints JSON. On a machine with several GPUs, pass ``devices`` to the pool
instead (one member per GPU) to measure what issue 12 asks for.
"""

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from supervisor import Worker, WorkerPool

MODEL = sys.argv[1]

PROMPTS = [f"prompt number {i}: " + "import os " * (i % 7 + 1) for i in range(16)]


def run(w: Worker | WorkerPool, n: int, tokens: int = 64) -> float:
    def one(p: str) -> int:
        return sum(1 for _ in w.generate(p, max_tokens=tokens))

    with ThreadPoolExecutor(n) as pool:
        list(pool.map(one, PROMPTS[:n]))  # warm-up
        started = time.perf_counter()
        total = sum(pool.map(one, PROMPTS[:n]))
        return total / (time.perf_counter() - started)


out: dict[str, dict[int, float]] = {}
with Worker(model=MODEL) as w:
    out["worker"] = {n: round(run(w, n), 1) for n in (8, 16)}
with WorkerPool(model=MODEL, members=2) as p:
    out["pool2"] = {n: round(run(p, n), 1) for n in (8, 16)}
sys.stdout.write(json.dumps(out) + "\n")
