"""Prompts against the context length and ``--max-prompt-tokens``, before any prefill.

A 10 MB prompt against a 4,096-token context used to prefill for over ten
minutes. Now ``prepare`` refuses a prompt over the limit with
``context_length_exceeded`` (the message gives the prompt tokens,
``max_tokens`` and the context length), a long text is refused after
tokenizing a prefix of it, and ``max_tokens`` past the rest of the context
is clamped (``finish_reason: "length"``).
"""

from __future__ import annotations

import inspect
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.engines.context_limits import (
    CUT_MARGIN,
    DEFAULT_MAX_PROMPT_TOKENS,
    ContextLimits,
    chat_chars,
)
from protocol.errors import ContextLengthExceeded
from protocol.requests import Chat, ChatMessage, Sampling, TextPart
from tests.harness import Line, WorkerProcess, text_of

CONTEXT = 64
CAP = 200
# 10 MB of Python source: about 3.8 M tokens with the fixture tokenizer, which
# takes 13 s to tokenize whole and would prefill for hours
HUGE = (inspect.getsource(json) * 1000)[:10_000_000]


def words(n: int) -> str:
    """A prompt of exactly ``n`` tokens with the fixture tokenizer ("word" then " word"s)."""
    return "word" + " word" * (n - 1)


@pytest.fixture(scope="module")
def worker(tiny_model: Path) -> Iterator[WorkerProcess]:
    """A worker with a small cap and the fixture loaded with a small context."""
    with WorkerProcess("bridge", ["--max-prompt-tokens", str(CAP)]) as w:
        loaded = w.call({"cmd": "load", "id": "l", "path": str(tiny_model), "context_len": CONTEXT})
        assert loaded["type"] == "loaded", loaded
        assert loaded["context_len"] == CONTEXT
        yield w


def tokens_of(worker: WorkerProcess, text: str) -> int:
    reply = worker.call({"cmd": "tokenize", "id": "t", "text": text})
    return len(reply["tokens"])


def numbers(message: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", message)]


def still_serves(worker: WorkerProcess) -> None:
    lines = worker.request({"cmd": "generate", "id": "ok", "prompt": "Hello", "max_tokens": 3})
    assert lines[-1]["type"] == "done" and lines[-1]["tokens_generated"] == 3


def test_the_words_helper_counts_tokens(worker: WorkerProcess) -> None:
    assert tokens_of(worker, words(10)) == 10
    assert tokens_of(worker, words(CONTEXT)) == CONTEXT


# -- over the context ----------------------------------------------------------------


def test_a_prompt_over_the_context_is_refused_with_the_numbers(worker: WorkerProcess) -> None:
    prompt = words(100)
    reply = worker.call({"cmd": "generate", "id": "g", "prompt": prompt, "max_tokens": 7})
    assert reply["type"] == "error" and reply["code"] == "context_length_exceeded", reply
    message = reply["error"]
    assert message.startswith("prompt: ")
    assert "100 prompt tokens" in message
    assert "max_tokens 7" in message
    assert f"context length of {CONTEXT} tokens" in message
    still_serves(worker)


def test_a_chat_over_the_context_is_refused(worker: WorkerProcess) -> None:
    messages = [{"role": "user", "content": words(100)}]
    reply = worker.call({"cmd": "chat", "id": "c", "messages": messages, "max_tokens": 5})
    assert reply["code"] == "context_length_exceeded", reply
    assert reply["error"].startswith("messages: ")
    assert "max_tokens 5" in reply["error"] and str(CONTEXT) in reply["error"]
    still_serves(worker)


def test_the_prompt_must_leave_room_for_one_token(worker: WorkerProcess) -> None:
    fits = worker.request(
        {"cmd": "generate", "id": "f", "prompt": words(CONTEXT - 1), "max_tokens": 50}
    )
    assert fits[-1]["type"] == "done", fits[-1]
    assert fits[-1]["prompt_tokens"] == CONTEXT - 1
    assert fits[-1]["tokens_generated"] == 1
    assert fits[-1]["finish_reason"] == "length"
    full = worker.call({"cmd": "generate", "id": "x", "prompt": words(CONTEXT)})
    assert full["code"] == "context_length_exceeded", full
    assert f"{CONTEXT} prompt tokens" in full["error"]


def test_max_tokens_past_the_context_is_clamped_to_it(worker: WorkerProcess) -> None:
    lines = worker.request({"cmd": "generate", "id": "m", "prompt": words(10), "max_tokens": 1000})
    done = lines[-1]
    assert done["type"] == "done", done
    assert done["finish_reason"] == "length"
    assert done["prompt_tokens"] == 10
    assert done["tokens_generated"] == CONTEXT - 10
    assert len([line for line in lines if line["type"] == "token"]) == CONTEXT - 10


def test_max_tokens_within_the_context_is_kept(worker: WorkerProcess) -> None:
    lines = worker.request({"cmd": "generate", "id": "k", "prompt": words(10), "max_tokens": 5})
    assert lines[-1]["tokens_generated"] == 5


def test_a_chat_is_clamped_too(worker: WorkerProcess) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    lines = worker.request({"cmd": "chat", "id": "cm", "messages": messages, "max_tokens": 999})
    done = lines[-1]
    assert done["finish_reason"] == "length"
    assert done["prompt_tokens"] + done["tokens_generated"] == CONTEXT


def test_the_legacy_dialect_gets_the_error_line(worker: WorkerProcess) -> None:
    worker.send({"cmd": "generate", "prompt": words(100), "max_tokens": 4})
    line = worker.read()
    assert "id" not in line and line["code"] == "context_length_exceeded", line
    still_serves(worker)


# -- a cached conversation still counts the whole prompt -------------------------------


def test_a_cached_conversation_counts_the_whole_prompt(worker: WorkerProcess) -> None:
    first = [{"role": "user", "content": words(20)}]
    one = worker.request(
        {"cmd": "chat", "id": "t1", "cache_key": "conv", "messages": first, "max_tokens": 4}
    )
    assert one[-1]["type"] == "done", one[-1]
    history = [*first, {"role": "assistant", "content": text_of(one)}]
    # a short new turn: it fits, and max_tokens is clamped against the whole prompt
    short = [*history, {"role": "user", "content": "Go on"}]
    two = worker.request(
        {"cmd": "chat", "id": "t2", "cache_key": "conv", "messages": short, "max_tokens": 999}
    )
    done = two[-1]
    assert done["cached_tokens"] > 0, done
    assert done["prompt_tokens"] + done["tokens_generated"] == CONTEXT
    # a new turn that alone would fit, but not with the cached history
    long = [*history, {"role": "user", "content": words(40)}]
    three = worker.call(
        {"cmd": "chat", "id": "t3", "cache_key": "conv", "messages": long, "max_tokens": 4}
    )
    assert three["code"] == "context_length_exceeded", three
    assert numbers(three["error"])[0] > CONTEXT


# -- 10 MB prompts ---------------------------------------------------------------------


@pytest.mark.parametrize("cmd", ["generate", "chat"])
def test_a_10_mb_prompt_is_refused_in_seconds(worker: WorkerProcess, cmd: str) -> None:
    request: dict[str, Any] = {"cmd": cmd, "id": "huge", "max_tokens": 9}
    if cmd == "generate":
        request["prompt"] = HUGE
    else:
        request["messages"] = [{"role": "user", "content": HUGE}]
    started = time.monotonic()
    reply = worker.call(request, timeout=60)
    elapsed = time.monotonic() - started
    assert reply["code"] == "context_length_exceeded", reply
    assert "at least" in reply["error"] and "max_tokens 9" in reply["error"]
    assert "characters" in reply["error"]  # how much of the text was counted
    assert elapsed < 20, elapsed  # about 0.2 s; tokenizing it whole takes 13 s
    still_serves(worker)


def test_inspect_is_held_to_the_same_limits(worker: WorkerProcess, tmp_path: Path) -> None:
    # inspect runs the whole prompt in one forward pass: a prompt over the
    # context is refused before any file or directory is made
    target = tmp_path / "never-made"
    for prompt in (words(100), HUGE):
        started = time.monotonic()
        reply = worker.call(
            {"cmd": "inspect", "id": "i", "prompt": prompt, "dir": str(target)}, timeout=60
        )
        assert reply["code"] == "context_length_exceeded", reply
        assert reply["error"].startswith("prompt: "), reply
        assert time.monotonic() - started < 20
    assert not target.exists()
    fits = worker.call({"cmd": "inspect", "id": "i", "prompt": words(10), "dir": str(target)})
    assert fits["type"] == "inspected", fits
    still_serves(worker)


# -- the cap -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def capped(tiny_model: Path) -> Iterator[WorkerProcess]:
    """The cap below the model's own context (4096)."""
    with WorkerProcess("bridge", ["--max-prompt-tokens", "100"]) as w:
        loaded = w.call({"cmd": "load", "id": "l", "path": str(tiny_model)})
        assert loaded["context_len"] == 4096
        yield w


def test_hello_reports_the_cap(capped: WorkerProcess) -> None:
    assert capped.call({"cmd": "hello", "id": "h"})["limits"]["max_prompt_tokens"] == 100


def test_a_prompt_over_the_cap_is_refused(capped: WorkerProcess) -> None:
    reply = capped.call({"cmd": "generate", "id": "g", "prompt": words(150), "max_tokens": 3})
    assert reply["code"] == "context_length_exceeded", reply
    message = reply["error"]
    assert "150 prompt tokens" in message and "max_tokens 3" in message
    assert "--max-prompt-tokens" in message and "100" in message
    assert "context length is 4096" in message
    at_cap = capped.request({"cmd": "generate", "id": "a", "prompt": words(100), "max_tokens": 2})
    assert at_cap[-1]["type"] == "done" and at_cap[-1]["tokens_generated"] == 2
    messages = [{"role": "user", "content": words(150)}]
    chat = capped.call({"cmd": "chat", "id": "c", "messages": messages})
    assert chat["code"] == "context_length_exceeded" and chat["error"].startswith("messages:")


def test_a_10_mb_prompt_over_the_cap_is_refused_in_seconds(capped: WorkerProcess) -> None:
    started = time.monotonic()
    reply = capped.call({"cmd": "generate", "id": "huge", "prompt": HUGE}, timeout=60)
    assert reply["code"] == "context_length_exceeded", reply
    assert time.monotonic() - started < 20
    still_serves(capped)


def test_the_default_cap_and_no_cap(tiny_model: Path) -> None:
    with WorkerProcess("bridge") as w:
        limits = w.call({"cmd": "hello", "id": "h"})["limits"]
        assert limits["max_prompt_tokens"] == DEFAULT_MAX_PROMPT_TOKENS
    with WorkerProcess("bridge", ["--max-prompt-tokens", "0"]) as w:
        assert "max_prompt_tokens" not in w.call({"cmd": "hello", "id": "h"})["limits"]
        # no cap: the context (4096) still limits
        w.call({"cmd": "load", "id": "l", "path": str(tiny_model)})
        reply = w.call({"cmd": "generate", "id": "g", "prompt": words(5000)})
        assert reply["code"] == "context_length_exceeded"
        assert "context length of 4096" in reply["error"]


# -- the vision engine -------------------------------------------------------------------


@pytest.fixture(scope="module")
def vlm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    pytest.importorskip("mlx_vlm")
    from bridge.demo import vlm as demo_vlm

    path = demo_vlm.ensure(tmp_path_factory.mktemp("models") / "tiny-vlm")
    with WorkerProcess("bridge") as w:
        loaded = w.call(
            {"cmd": "load", "id": "l", "path": str(path), "context_len": CONTEXT}, timeout=120
        )
        assert loaded["type"] == "loaded" and loaded["vision"], loaded
        yield w


def test_the_vision_engine_refuses_and_clamps(vlm: WorkerProcess) -> None:
    requests: list[dict[str, Any]] = [
        {"cmd": "generate", "id": "g", "prompt": words(100), "max_tokens": 3},
        {"cmd": "chat", "id": "c", "messages": [{"role": "user", "content": words(100)}]},
        {"cmd": "generate", "id": "h", "prompt": HUGE},
        {"cmd": "chat", "id": "i", "messages": [{"role": "user", "content": HUGE}]},
    ]
    for request in requests:
        started = time.monotonic()
        reply: Line = vlm.call(request, timeout=60)
        assert reply["code"] == "context_length_exceeded", reply
        assert f"context length of {CONTEXT}" in reply["error"]
        assert time.monotonic() - started < 20
    lines = vlm.request({"cmd": "generate", "id": "m", "prompt": words(10), "max_tokens": 999})
    assert lines[-1]["finish_reason"] == "length"
    assert lines[-1]["prompt_tokens"] + lines[-1]["tokens_generated"] == CONTEXT


# -- ContextLimits in process, with a fake tokenizer at the encode seam -----------------


class CountingEncoder:
    """One token per ``chars_per_token`` characters; records the lengths it was given."""

    def __init__(self, chars_per_token: int = 2) -> None:
        self.chars_per_token = chars_per_token
        self.seen: list[int] = []

    def __call__(self, text: str) -> list[int]:
        self.seen.append(len(text))
        return [0] * -(-len(text) // self.chars_per_token)


@pytest.mark.parametrize(
    ("context", "cap", "limit"),
    [
        (4096, 131072, 4095),
        (4096, 100, 100),
        (None, 100, 100),
        (4096, None, 4095),
        (None, None, None),
    ],
)
def test_the_prompt_limit(context: int | None, cap: int | None, limit: int | None) -> None:
    assert ContextLimits(context_len=context, max_prompt_tokens=cap).prompt_limit == limit


def test_a_long_text_is_refused_after_a_prefix() -> None:
    encode = CountingEncoder()
    limits = ContextLimits(context_len=4096)
    text = "ab " * 3_000_000
    with pytest.raises(ContextLengthExceeded) as caught:
        limits.encode(encode, text, field="prompt", sampling=Sampling(), request_id=1)
    assert encode.seen and max(encode.seen) < 20 * 4096  # never the 9 M characters
    assert caught.value.request_id == 1
    assert "at least" in caught.value.message


def test_a_text_that_fits_is_encoded_once_when_short_and_whole_when_long() -> None:
    short = CountingEncoder()
    limits = ContextLimits(context_len=4096)
    assert (
        len(limits.encode(short, "a" * 100, field="p", sampling=Sampling(), request_id=None)) == 50
    )
    assert short.seen == [100]
    # long in characters but few tokens (the fake gives one per 2 characters,
    # so 8,000 characters make 4,000 tokens, under the limit)
    long = CountingEncoder()
    text = "a" * 8000
    tokens = limits.encode(long, text, field="p", sampling=Sampling(), request_id=None)
    assert len(tokens) == 4000 and long.seen[-1] == 8000
    assert sum(long.seen) < 2 * 8000


def test_a_prefix_within_the_margin_is_not_enough_to_refuse() -> None:
    limits = ContextLimits(context_len=101)  # at most 100 prompt tokens
    size = 4 * (100 + CUT_MARGIN)  # the first prefix: its cut may add CUT_MARGIN tokens
    encode = CountingEncoder(chars_per_token=4)
    tokens = limits.encode(encode, "x" * 1000, field="p", sampling=Sampling(), request_id=None)
    assert encode.seen == [size, 1000]  # the prefix had 108 tokens: not proof enough
    with pytest.raises(ContextLengthExceeded, match="250 prompt tokens"):
        limits.check(len(tokens), field="p", sampling=Sampling(), request_id=None)


def test_check_clamps_max_tokens_to_the_rest_of_the_context() -> None:
    limits = ContextLimits(context_len=100)
    assert (
        limits.check(90, field="p", sampling=Sampling(max_tokens=50), request_id=None).max_tokens
        == 10
    )
    assert (
        limits.check(90, field="p", sampling=Sampling(max_tokens=5), request_id=None).max_tokens
        == 5
    )
    no_context = ContextLimits(context_len=None)
    assert no_context.check(90, field="p", sampling=Sampling(), request_id=None).max_tokens == 256


def test_chat_chars_counts_contents_tool_calls_and_tools() -> None:
    chat = Chat(
        messages=(
            ChatMessage(role="user", content="abc"),
            ChatMessage(role="user", content=(TextPart(text="de"),)),
            ChatMessage(role="assistant", tool_calls=({"id": "x"},)),
        ),
        tools=({"type": "function"},),
    )
    assert chat_chars(chat) == 3 + 2 + len('[{"id":"x"}]') + len('[{"type":"function"}]')
