"""Vision chats sent together: decoded together against one at a time, in the same run.

    python bench/vision_bench.py VLM_DIR [--concurrency 1,4,8] [--max-tokens 64]
                                 [--rounds 3] [--out FILE]

Two workers on the same vision model (``supervisor.Worker``): the default
(the first request on the solo lane, the others in mlx-vlm's batch beside
it, :mod:`bridge.engines.vision.batch`) and ``--max-concurrency 1`` (one at
a time, as the vision engine decoded before). For each N and round, N
greedy chats at once, each with its own 32×32 image, on each worker by
turns. Reports aggregate tok/s (generated tokens over wall time), the
worker's own time to first token (median and the worst) and its time in
the queue (worst). Prints JSON; ``--out`` is rewritten after every N.
"""

from __future__ import annotations

import base64
import io
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from report import burst_arguments, emit, median_ratio, save  # this folder, run as a script

from supervisor import Worker

COLOURS = ("red", "green", "blue", "yellow", "cyan", "magenta", "white", "gray")


def png(colour: str) -> str:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def burst(w: Worker, n: int, max_tokens: int) -> dict[str, Any]:
    def one(i: int) -> tuple[int, float, float]:
        image = png(COLOURS[i % len(COLOURS)])
        content = [
            {"type": "text", "text": f"What is in picture {i}?"},
            {"type": "image_url", "image_url": {"url": image}},
        ]
        s = w.chat([{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0.0)
        s.text()
        t = s.result.timings
        return s.result.usage.completion_tokens, t.ttft_ms or 0.0, t.queue_ms

    with ThreadPoolExecutor(n) as pool:
        started = time.perf_counter()
        results = list(pool.map(one, range(n)))
        seconds = time.perf_counter() - started
    tokens = sum(r[0] for r in results)
    return {
        "tok_s": round(tokens / seconds, 1),
        "tokens": tokens,
        "ttft_ms_median": round(statistics.median(r[1] for r in results), 1),
        "ttft_ms_max": round(max(r[1] for r in results), 1),
        "queue_ms_max": round(max(r[2] for r in results), 1),
    }


def main() -> None:
    args = burst_arguments(concurrency="1,4,8", max_tokens=64)
    result: dict[str, Any] = {"max_tokens": args.max_tokens}
    one_at_a_time = [sys.executable, "-m", "bridge", "--max-concurrency", "1"]
    with (
        Worker(model=args.model, start_timeout=900, request_timeout=900) as together,
        Worker(one_at_a_time, model=args.model, start_timeout=900, request_timeout=900) as solo,
    ):
        for w in (together, solo):
            burst(w, 2, 16)  # warm-up
        for n in args.concurrency:
            rounds = []
            for _ in range(args.rounds):
                rounds.append({"together": burst(together, n, args.max_tokens)})
                rounds[-1]["one_at_a_time"] = burst(solo, n, args.max_tokens)
            ratio = median_ratio(rounds, "together", "one_at_a_time")
            result[f"n{n}"] = {"rounds": rounds, "together_over_one_at_a_time": ratio}
            save(result, args.out)
    emit(result)


if __name__ == "__main__":
    main()
