"""Speculative decoding's mechanism at both ends, against no draft, in one run.

    python bench/draft_bench.py TARGET_DIR OTHER_DIR [--tokens 256] [--draft-tokens 3]
                                [--rounds 3] [--out FILE]

Random weights make no real draft, so the two ends are measured: a draft
that always agrees (the target itself: every proposal accepted) and one
that need not (OTHER_DIR, another random model with the same tokenizer: the
fixture's other seed agreed on none, the 0.6B shape under the 4B on 75%,
docs/benchmarks.md). One ``supervisor.Worker`` per configuration, one stream at a
time (the solo lane, where the draft is used), greedy: decode tok/s (the
worker's ``generation_tps``, median of ``--rounds``) and the share of tokens
the draft proposed and the model accepted. Prints JSON.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from report import emit, save  # this folder, run as a script

from supervisor import Worker

PROMPT = "The history of the printing press begins"


def measure(
    target: str, draft: str | None, tokens: int, drafts: int, rounds: int
) -> dict[str, Any]:
    with Worker(start_timeout=900, request_timeout=900) as w:
        w.load(target, extra={"draft_path": draft} if draft else None, timeout=900)
        extra = {"num_draft_tokens": drafts} if draft else None
        w.generate(PROMPT, max_tokens=16, temperature=0.0, extra=extra).text()  # warm-up
        rates, accepted, produced = [], 0, 0
        for _ in range(rounds):
            s = w.generate(PROMPT, max_tokens=tokens, temperature=0.0, extra=extra)
            s.text()
            done = s.result
            rates.append(done.timings.generation_tps)
            produced += done.usage.completion_tokens
            accepted += done.usage.draft_tokens_accepted or 0
        return {
            "tok_s": round(statistics.median(rates), 1),
            "rounds_tok_s": [round(r, 1) for r in rates],
            "accepted_share": round(accepted / produced, 3) if draft and produced else None,
        }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("target")
    p.add_argument("other")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--draft-tokens", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args()
    result: dict[str, Any] = {"tokens": args.tokens, "num_draft_tokens": args.draft_tokens}
    for label, draft in (("none", None), ("itself", args.target), ("other", args.other)):
        result[label] = measure(args.target, draft, args.tokens, args.draft_tokens, args.rounds)
        save(result, args.out)
    emit(result)


if __name__ == "__main__":
    main()
