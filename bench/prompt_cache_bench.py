"""Time to first token of a late turn, prompt cache warm against cold, in one worker.

    python bench/prompt_cache_bench.py --model DIR [--history 2000] [--rounds 5] [--out FILE]

Each round builds a conversation of about ``--history`` tokens (a system turn,
then user turns and the model's own answers, run through the worker under one
``cache_key``), then asks turn N twice:

- **warm**: with the conversation's ``cache_key``; the cache holds the whole
  history up to the previous answer, so only the new turn is prefilled;
- **cold**: the same request with a ``cache_key`` never used before, so the
  whole prompt is prefilled (the order alternates between rounds).

Time to first token is taken by the host (request written → first ``token``
line read) and by the worker (``done.ttft_ms``). The two answers must be the
same tokens (greedy). Target: warm ≤ 0.25 × cold.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

from worker_bench import Pipe

STDLIB = Path(os.__file__).parent
SOURCES = ["textwrap.py", "argparse.py", "dataclasses.py", "functools.py", "pprint.py"]


def text_chunks(chars: int) -> list[str]:
    """Distinct chunks of standard-library source, ``chars`` long each."""
    out = []
    for name in SOURCES:
        text = (STDLIB / name).read_text()
        out.extend(text[i : i + chars] for i in range(0, len(text) - chars, chars))
    return out


def turn(
    pipe: Pipe, messages: list[dict[str, Any]], key: str, max_tokens: int
) -> tuple[float, dict[str, Any], list[int], str]:
    """One chat request: (host TTFT in ms, done line, token ids, text)."""
    sent = pipe.send(
        {
            "cmd": "chat",
            "id": key,
            "messages": messages,
            "cache_key": key,
            "max_tokens": max_tokens,
        }
    )
    lines = pipe.until_terminal()
    done = lines[-1][1]
    if done["type"] != "done":
        raise RuntimeError(f"request failed: {done}")
    tokens = [(t, line) for t, line in lines if line["type"] == "token"]
    ttft = (tokens[0][0] - sent) * 1000 if tokens else float("nan")
    return (
        ttft,
        done,
        [line["token_id"] for _, line in tokens],
        "".join(line["token"] for _, line in tokens),
    )


def conversation(
    pipe: Pipe, key: str, history: int, chunks: list[str], answer_tokens: int
) -> list[dict[str, Any]]:
    """A conversation of about ``history`` prompt tokens, ending with a user turn."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You review Python code.\n" + chunks.pop()},
        {"role": "user", "content": "Review this:\n" + chunks.pop()},
    ]
    while True:
        _, done, _, answer = turn(pipe, messages, key, answer_tokens)
        if done["prompt_tokens"] + done["tokens_generated"] >= history:
            return [
                *messages,
                {"role": "assistant", "content": answer},
                {"role": "user", "content": "Thanks. What would you change first, and why?"},
            ]
        messages += [
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "And this:\n" + chunks.pop()},
        ]


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True)
    p.add_argument("--history", type=int, default=2000, help="tokens of history (2000)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--answer-tokens", type=int, default=64, help="tokens per earlier answer")
    p.add_argument("--chunk-chars", type=int, default=1200, help="characters per user turn")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens of turn N's answer")
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    pipe = Pipe()
    try:
        pipe.send({"cmd": "load", "id": "load", "path": args.model})
        loaded = pipe.until_terminal()[-1][1]
        if loaded["type"] != "loaded":
            raise RuntimeError(f"load failed: {loaded}")
        chunks = text_chunks(args.chunk_chars)
        turn(pipe, [{"role": "user", "content": "warm up"}], "warm-up", 4)
        rows = []
        for r in range(args.rounds):
            messages = conversation(pipe, f"conv-{r}", args.history, chunks, args.answer_tokens)
            order = ("warm", "cold") if r % 2 == 0 else ("cold", "warm")
            row: dict[str, Any] = {}
            for kind in order:
                key = f"conv-{r}" if kind == "warm" else f"fresh-{r}"
                ttft, done, ids, _ = turn(pipe, messages, key, args.max_tokens)
                row[kind] = {
                    "host_ttft_ms": ttft,
                    "worker_ttft_ms": done["ttft_ms"],
                    "prompt_tokens": done["prompt_tokens"],
                    "cached_tokens": done["cached_tokens"],
                    "ids": ids,
                }
            row["same_tokens"] = row["warm"].pop("ids") == row["cold"].pop("ids")
            rows.append(row)
            sys.stderr.write(json.dumps(row) + "\n")
        pipe.send({"cmd": "info", "id": "info"})
        info = pipe.until_terminal()[-1][1]
    finally:
        pipe.close()

    def median(kind: str, figure: str) -> float:
        return statistics.median(row[kind][figure] for row in rows)

    results = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
        "python": platform.python_version(),
        "model": args.model,
        "rounds": args.rounds,
        "prompt_tokens": median("warm", "prompt_tokens"),
        "cached_tokens": median("warm", "cached_tokens"),
        "warm_host_ttft_ms": median("warm", "host_ttft_ms"),
        "cold_host_ttft_ms": median("cold", "host_ttft_ms"),
        "warm_worker_ttft_ms": median("warm", "worker_ttft_ms"),
        "cold_worker_ttft_ms": median("cold", "worker_ttft_ms"),
        "same_tokens": all(row["same_tokens"] for row in rows),
        "prompt_cache": info.get("memory", {}).get("prompt_cache"),
        "rows": rows,
    }
    results["ratio_host"] = results["warm_host_ttft_ms"] / results["cold_host_ttft_ms"]
    results["ratio_worker"] = results["warm_worker_ttft_ms"] / results["cold_worker_ttft_ms"]
    text = json.dumps(results, indent=2)
    sys.stdout.write(text + "\n")
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
