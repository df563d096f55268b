"""The spec's rules about one generation's lines, shared by the cases.

- A generation ends with exactly one ``done`` (or ``error``) after its
  ``token`` lines.
- Without stop strings nothing is held back: each generated token is one
  ``token`` line, so ``tokens_generated`` equals the number of lines (an EOS
  that flushes held text may add one line, with ``finish_reason: "stop"``).
- ``length`` means ``tokens_generated == max_tokens``.
- A cancelled generation's ``done`` tells where the cancel found it:
  queued (``prompt_tokens`` 0), in prefill (no token, ``ttft_ms`` null) or
  decoding (tokens, ``ttft_ms`` set).
"""

from __future__ import annotations

from typing import Final

import orjson

from ..matching import Check
from ..process import shorten
from ..session import Exchange, Line, Session, fail

__all__ = [
    "LONG",
    "PACED",
    "long_generate",
    "check_cancelled",
    "check_finished",
    "done_of",
    "landed",
    "prefill_prompt",
    "round_trip",
    "words",
]

LONG: Final = 100_000
"""max_tokens for a generation that only a cancel (or quit) ends."""

PACED: Final = {"token_delay": 0.001}
"""mock_worker's fault object for a long generation: one token a millisecond,
not 70,000 a second, so the kit is not flooded before its cancel arrives.
Other workers ignore the ``mock`` field (unknown fields are ignored)."""


def long_generate(
    s: Session, prompt: str = "Once upon a time", *, prefix: str = "long"
) -> dict[str, object]:
    """A generate request that runs until it is cancelled."""
    return {
        "cmd": "generate",
        "id": s.fresh_id(prefix),
        "prompt": prompt,
        "max_tokens": LONG,
        "mock": PACED,
    }


_WORDS: Final = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
    "november oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu"
).split()

PREFILL_TARGET_S: Final = 2.0
PREFILL_MIN_WORDS: Final = 400
PREFILL_MAX_WORDS: Final = 20_000


def words(count: int, start: int = 0) -> str:
    """``count`` words of the NATO alphabet, cycled: a prompt of a known length."""
    return " ".join(_WORDS[(start + i) % len(_WORDS)] for i in range(count))


def done_of(exchange: Exchange) -> Line:
    line = exchange.terminal
    if line is None or line.get("type") != "done":
        shown = shorten(orjson.dumps(line)) if line is not None else "nothing"
        raise fail(f"{exchange.label} should end with done, got {shown}")
    return line


def check_finished(exchange: Exchange, *, max_tokens: int, logprobs: bool = False) -> Line:
    """A generation without stop strings that ran to its end."""
    done = done_of(exchange)
    tokens = exchange.tokens
    count = done["tokens_generated"]
    reason = done["finish_reason"]
    where = exchange.label
    if reason == "length":
        if count != max_tokens or len(tokens) != max_tokens:
            raise fail(
                f"{where}: finish_reason length with max_tokens {max_tokens}, but "
                f"tokens_generated {count} and {len(tokens)} token lines"
            )
    elif reason == "stop":
        if count >= max_tokens or len(tokens) not in (count, count + 1):
            raise fail(
                f"{where}: finish_reason stop, tokens_generated {count}, "
                f"{len(tokens)} token lines, max_tokens {max_tokens}"
            )
    else:
        raise fail(f"{where}: finish_reason {reason!r}, but it had no stop strings and no cancel")
    if done["prompt_tokens"] < 1:
        raise fail(f"{where}: prompt_tokens {done['prompt_tokens']} for a non-empty prompt")
    if done["ttft_ms"] is None:
        raise fail(f"{where}: ttft_ms is null, but the model produced output")
    for token in tokens:
        has = "logprob" in token or "top_logprobs" in token
        if has != logprobs:
            raise fail(
                f"{where}: logprob fields {'missing' if logprobs else 'present'} on a token"
                f" line (they come only with logprobs > 0): {shorten(orjson.dumps(token))}"
            )
    return done


def check_cancelled(exchange: Exchange) -> str:
    """A cancelled generation's done; returns the phase it was cancelled in."""
    done = done_of(exchange)
    where = exchange.label
    if done["finish_reason"] != "cancelled":
        raise fail(f"{where}: finish_reason {done['finish_reason']!r}, expected 'cancelled'")
    lines = len(exchange.tokens)
    count = done["tokens_generated"]
    if count != lines:
        raise fail(
            f"{where}: tokens_generated {count}, but {lines} token lines were written"
            " (without stop strings every counted token is written)"
        )
    if done["prompt_tokens"] == 0:
        if lines or done["ttft_ms"] is not None:
            raise fail(f"{where}: prompt_tokens 0 (cancelled while queued) but it produced output")
        return "queued"
    if lines == 0:
        return "prefill"
    if done["ttft_ms"] is None:
        raise fail(f"{where}: {lines} tokens were written but ttft_ms is null")
    return "decode"


def landed(phase: str, done: Line, seconds: float) -> str:
    """A note on where a cancel found a generation with a long prompt."""
    return (
        f"cancel landed in {phase} ({done['prompt_tokens']:,} prompt tokens),"
        f" done in {seconds * 1000:.0f} ms"
    )


def round_trip(text: str) -> Check:
    """``text`` as detokenize gives it back (SentencePiece tokenizers may add one
    leading space)."""
    return Check(repr(text), lambda got: got in (text, " " + text))


def prompt_limit(s: Session) -> int | None:
    """The most prompt tokens the worker accepts: the loaded model's context
    (``info``) less one, and hello's ``limits.max_prompt_tokens``; None if neither."""
    limits = []
    info = s.call({"cmd": "info", "id": s.fresh_id("info")})
    context = info.get("context_len")
    if isinstance(context, int):
        limits.append(context - 1)
    cap = (s.hello or {}).get("limits", {}).get("max_prompt_tokens")
    if isinstance(cap, int):
        limits.append(cap)
    return min(limits) if limits else None


def prefill_prompt(s: Session) -> str:
    """A prompt whose prefill takes about 2 s on this worker (measured once per worker
    with a 200-word probe; at least 400 and at most 20,000 words), and that fits
    the worker's prompt limit."""
    cached = s.memo.get("prefill_prompt")
    if isinstance(cached, str):
        return cached
    probe = s.stream(
        {"cmd": "generate", "id": s.fresh_id("probe"), "prompt": words(200), "max_tokens": 1}
    )
    done = done_of(probe)
    seconds = done["prompt_tokens"] / done["prompt_tps"] if done["prompt_tps"] > 0 else 0.0
    count = PREFILL_MAX_WORDS if seconds <= 0 else int(200 * PREFILL_TARGET_S / seconds)
    count = max(PREFILL_MIN_WORDS, min(PREFILL_MAX_WORDS, count))
    most = prompt_limit(s)
    if most is not None and done["prompt_tokens"] > 0:
        # a longer prompt is context_length_exceeded; keep a tenth in hand
        count = min(count, int(most * 0.9 * 200 / done["prompt_tokens"]))
    prompt = words(count)
    s.memo["prefill_prompt"] = prompt
    return prompt


def max_concurrency(s: Session) -> int:
    """Generations the worker decodes together, as its ``hello`` says (1 when it does not say)."""
    assert s.hello is not None
    value = s.hello["limits"].get("max_concurrency", 1)
    return value if isinstance(value, int) and not isinstance(value, bool) else 1
