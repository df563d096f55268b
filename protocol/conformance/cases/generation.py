"""Every command with a model loaded, in the addressed dialect.

The checks hold for any model: they compare the worker with itself (the same
greedy request twice gives the same tokens; a stop string cut from the first
answer cuts the second one there), never with recorded token ids.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Final

from ...replies import ModelFacts
from ..matching import ABSENT, Check, StartsWith
from ..session import CaseSkipped, Line, Session, fail, text_of, token_ids
from ..table import Case, Group
from .rules import (
    check_cancelled,
    check_finished,
    done_of,
    long_generate,
    max_concurrency,
    round_trip,
)

__all__ = ["FACT_KEYS", "GROUP"]

FACT_KEYS: Final = tuple(fact.name for fact in dataclasses.fields(ModelFacts))
"""The model facts that ``loaded`` and ``info`` both report (their wire names)."""

PROMPT: Final = "The quick brown fox jumps over the lazy dog"


NOT_A_MODEL_MOCK: Final = {"fail_load": "load_failed"}
MISSING_MOCK: Final = {"fail_load": "model_not_found"}
MISSING_PATH: Final = "/nonexistent/mlx-bridge-conformance/model"
TINY_PNG: Final = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8"
    "/5+hHgAHggJ/PchI7wAAAABJRU5ErkJggg=="
)


def _generate(s: Session, max_tokens: int, **extra: object) -> dict[str, object]:
    return {
        "cmd": "generate",
        "id": s.fresh_id("gen"),
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        **extra,
    }


def _facts(s: Session) -> Line:
    assert s.loaded is not None
    return s.loaded


def load(s: Session) -> str:
    assert s.model_path is not None
    rid = s.fresh_int()
    loaded = s.call({"cmd": "load", "id": rid, "path": s.model_path})
    s.expect(loaded, {"type": "loaded", "id": rid, "ok": True}, "load")
    s.loaded = loaded
    hello = s.call({"cmd": "hello", "id": s.fresh_id("hello")})
    if hello["model"] != loaded["path"]:
        raise fail(f"after a load, hello's model is {hello['model']!r}, not {loaded['path']!r}")
    return (
        f"{loaded['model_type']}: vocab {loaded['vocab_size']:,}, {loaded['layers']} layers,"
        f" {loaded['load_ms']:.0f} ms"
    )


def generate(s: Session) -> str:
    exchange = s.stream(_generate(s, 8))
    done = check_finished(exchange, max_tokens=8)
    with_int = s.stream({**_generate(s, 3), "id": s.fresh_int()})
    check_finished(with_int, max_tokens=3)
    return f"{len(exchange.tokens)} tokens at {done['generation_tps']:.0f} tok/s"


def chat(s: Session) -> str:
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Say"}, {"type": "text", "text": "hi"}],
        },
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Again", "name": "kit"},
    ]
    request = {"cmd": "chat", "id": s.fresh_id("chat"), "messages": messages, "max_tokens": 6}
    exchange = s.stream(request)
    check_finished(exchange, max_tokens=6)
    kwargs = {
        **request,
        "id": s.fresh_id("chat"),
        "chat_template_kwargs": {"enable_thinking": False},
    }
    check_finished(s.stream(kwargs), max_tokens=6)
    return f"{done_of(exchange)['prompt_tokens']} prompt tokens after the template"


def greedy_is_deterministic(s: Session) -> str:
    first = s.stream(_generate(s, 10))
    second = s.stream(_generate(s, 10, temperature=0))
    check_finished(first, max_tokens=10)
    if token_ids(first.lines) != token_ids(second.lines):
        raise fail(
            f"the same greedy request twice gave {token_ids(first.lines)}"
            f" and {token_ids(second.lines)}"
        )
    return repr(text_of(first.lines)[:40])


def stop_strings(s: Session) -> str:
    full = s.stream(_generate(s, 16))
    check_finished(full, max_tokens=16)
    text = text_of(full.lines)
    if len(text) < 6:
        raise CaseSkipped(f"the model's answer {text!r} is too short to cut")
    start = len(text) // 2
    stop = text[start : start + 3]
    expected = text[: text.find(stop)]
    cut = s.stream(_generate(s, 16, stop=["\u2603never", stop]))
    done = done_of(cut)
    got = text_of(cut.lines)
    if done["finish_reason"] != "stop_sequence":
        raise fail(
            f"stop {stop!r} is in the answer {text!r},"
            f" but finish_reason is {done['finish_reason']!r}"
        )
    if got != expected:
        raise fail(f"with stop {stop!r} the text should be {expected!r}, got {got!r}")
    held = s.stream(_generate(s, 16, stop="\u2603never"))
    if (
        text_of(held.lines) != text
        or done_of(held)["finish_reason"] != done_of(full)["finish_reason"]
    ):
        raise fail(f"a stop string that never matches changed the answer: {text_of(held.lines)!r}")
    return f"stop {stop!r}: text cut to {len(expected)} of {len(text)} chars"


def sampling_options(s: Session) -> str:
    options = {
        "temperature": 0.8,
        "top_p": 0.9,
        "top_k": 40,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "repetition_context_size": 32,
        "logit_bias": {"1": -5.0},
        "seed": 7,
    }
    first = s.stream(_generate(s, 8, **options))
    second = s.stream(_generate(s, 8, **options))
    check_finished(first, max_tokens=8)
    if token_ids(first.lines) != token_ids(second.lines):
        raise fail("the same seed gave different tokens")
    alias = s.stream(_generate(s, 4, repeat_penalty=1.2, temperature=1))
    check_finished(alias, max_tokens=4)
    return "every option accepted; the same seed gives the same tokens"


def logprobs(s: Session) -> str:
    n = 3
    exchange = s.stream(_generate(s, 4, logprobs=n))
    check_finished(exchange, max_tokens=4, logprobs=True)
    for line in exchange.tokens:
        top = line["top_logprobs"]
        if len(top) != n:
            raise fail(f"logprobs {n}, but {len(top)} top_logprobs: {line}")
        values = [t["logprob"] for t in top if t["logprob"] is not None]
        if values != sorted(values, reverse=True):
            raise fail(f"top_logprobs are not most likely first: {line}")
    return f"{n} alternatives per token, most likely first"


def tokenize_detokenize(s: Session) -> str:
    text = "Hello, world! 123"
    ids = s.call(
        {"cmd": "tokenize", "id": s.fresh_id("tok"), "text": text, "add_special_tokens": False}
    )
    s.expect(
        ids, {"type": "tokens", "ok": True, "tokens": Check("a non-empty list", bool)}, "tokenize"
    )
    back = s.call({"cmd": "detokenize", "id": s.fresh_id("detok"), "tokens": ids["tokens"]})
    s.expect(back, {"type": "text", "ok": True, "text": round_trip(text)}, "detokenize of tokenize")
    empty = s.call(
        {"cmd": "tokenize", "id": s.fresh_id("tok"), "text": "", "add_special_tokens": False}
    )
    s.expect(empty, {"type": "tokens", "tokens": []}, "tokenize of ''")
    nothing = s.call({"cmd": "detokenize", "id": s.fresh_id("detok"), "tokens": []})
    s.expect(nothing, {"type": "text", "text": ""}, "detokenize of []")
    s.call({"cmd": "tokenize", "id": s.fresh_id("tok"), "text": text})  # default specials
    vocab = _facts(s)["vocab_size"]
    rid = s.fresh_id("oov")
    oov = s.call({"cmd": "detokenize", "id": rid, "tokens": [ids["tokens"][0], vocab]})
    pattern = {
        "type": "error",
        "id": rid,
        "code": "invalid_request",
        "error": StartsWith("tokens[1]: "),
    }
    s.expect(oov, pattern, f"detokenize of id {vocab} (= vocab_size)")
    return f"{text!r} -> {len(ids['tokens'])} tokens -> back; id {vocab:,} refused"


INSPECT_SHAPES: Final = (
    ("num_layers", "layers"),
    ("num_q_heads", "num_attention_heads"),
    ("num_kv_heads", "num_key_value_heads"),
    ("head_dim", "head_dim"),
    ("architecture", "model_type"),
)
"""``inspected`` figures and the model facts they must equal."""


def _check_inspect_files(reply: Line, directory: Path) -> None:
    """One ``queries_NN.bin`` and ``keys_NN.bin`` per layer, of float32 shapes
    ``[heads, seq_len, head_dim]``, and ``inspect.json``."""
    per_head = 4 * reply["seq_len"] * reply["head_dim"]
    expected: dict[str, int | None] = {"inspect.json": None}
    for layer in range(reply["num_layers"]):
        expected[f"queries_{layer:02d}.bin"] = reply["num_q_heads"] * per_head
        expected[f"keys_{layer:02d}.bin"] = reply["num_kv_heads"] * per_head
    for name, size in expected.items():
        path = directory / name
        if not path.is_file():
            raise fail(f"inspect reported dir {str(directory)!r}, but it has no {name}")
        if size is not None and path.stat().st_size != size:
            raise fail(f"{name} is {path.stat().st_size} bytes, expected {size} (float32)")


def _serves_inspect(s: Session) -> bool:
    """hello's commands leave inspect out on a worker that does not serve it
    (a sharded one); such a worker refuses it with invalid_request."""
    hello = s.hello or {}
    commands = hello.get("commands")
    return not isinstance(commands, list) or "inspect" in commands


def inspect(s: Session) -> str:
    facts = _facts(s)
    if not _serves_inspect(s):
        rid = s.fresh_id("inspect")
        reply = s.call({"cmd": "inspect", "id": rid, "prompt": PROMPT})
        s.expect(reply, {"type": "error", "id": rid, "code": "invalid_request"}, "inspect")
        raise CaseSkipped("hello's commands leave out inspect: refused with invalid_request")
    directory = s.scratch / "inspect" / "nested"
    rid = s.fresh_id("inspect")
    reply = s.call({"cmd": "inspect", "id": rid, "prompt": PROMPT, "dir": str(directory)})
    if facts["vision"]:
        s.expect(reply, {"type": "error", "id": rid, "code": "invalid_request"}, "inspect")
        raise CaseSkipped("the model has vision support: inspect is refused")
    pattern = {"type": "inspected", "id": rid, "ok": True, "dir": str(directory)}
    s.expect(reply, pattern, f"inspect into {directory}")
    for key, fact in INSPECT_SHAPES:
        if reply[key] != facts[fact]:
            raise fail(f"inspect's {key} is {reply[key]!r}, but loaded's {fact} is {facts[fact]!r}")
    tokens = s.call({"cmd": "tokenize", "id": s.fresh_id("tok"), "text": PROMPT})["tokens"]
    if reply["seq_len"] != len(tokens):
        raise fail(
            f"inspect's seq_len is {reply['seq_len']}, but the prompt is {len(tokens)} tokens"
        )
    _check_inspect_files(reply, directory)
    again = s.scratch / "inspect-legacy"
    legacy = s.legacy_call({"cmd": "inspect", "prompt": "x y", "dir": str(again)})
    s.expect(legacy, {"type": "inspected", "id": ABSENT, "ok": True}, "legacy inspect")
    _check_inspect_files(legacy, Path(legacy["dir"]))
    rid = s.fresh_id("inspect")
    empty = s.call({"cmd": "inspect", "id": rid, "prompt": ""})
    pattern = {
        "type": "error",
        "id": rid,
        "code": "invalid_request",
        "error": StartsWith("prompt: "),
    }
    s.expect(empty, pattern, "inspect of an empty prompt")
    return (
        f"{reply['num_layers']} layers, {reply['num_q_heads']}/{reply['num_kv_heads']} q/kv heads,"
        f" {reply['seq_len']} tokens, head_dim {reply['head_dim']}; both dialects"
    )


def info(s: Session) -> str:
    facts = _facts(s)
    rid = s.fresh_id("info")
    reply = s.call({"cmd": "info", "id": rid})
    s.expect(reply, {"type": "info", "id": rid, "ok": True}, "info")
    legacy = s.legacy_call({"cmd": "info"})
    s.expect(legacy, {"type": "info", "id": ABSENT}, "legacy info")
    for key in FACT_KEYS:
        if reply.get(key) != facts.get(key):
            raise fail(f"info's {key} is {reply.get(key)!r}, loaded said {facts.get(key)!r}")
    memory = reply["memory"]
    return f"matches loaded; rss {memory['rss_bytes'] / 2**20:.0f} MiB"


def vision_refused(s: Session) -> None:
    if _facts(s)["vision"]:
        raise CaseSkipped("the model has vision support")
    content = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": TINY_PNG}},
    ]
    rid = s.fresh_id("img")
    reply = s.call({"cmd": "chat", "id": rid, "messages": [{"role": "user", "content": content}]})
    pattern = {
        "type": "error",
        "id": rid,
        "code": "vision_not_supported",
        "error": StartsWith("messages[0].content"),
    }
    s.expect(reply, pattern, "an image part for a text-only model")


def routing_by_id(s: Session) -> str:
    plans: list[tuple[str | int, str, int]] = [
        ("r-a", "alpha beta gamma", 5),
        (41, "delta echo", 6),
        ("r-c", "foxtrot", 4),
    ]
    solo = {}
    for rid, prompt, max_tokens in plans:
        solo[rid] = token_ids(
            s.stream(
                {"cmd": "generate", "id": rid, "prompt": prompt, "max_tokens": max_tokens}
            ).lines
        )
    exchanges = [
        s.send({"cmd": "generate", "id": rid, "prompt": p, "max_tokens": m}) for rid, p, m in plans
    ]
    tok = s.send({"cmd": "tokenize", "id": "r-tok", "text": "routed"})
    ping = s.send({"cmd": "ping", "id": "r-ping"})
    s.wait(*exchanges, tok, ping)
    for exchange, (rid, _, max_tokens) in zip(exchanges, plans, strict=True):
        assert exchange is not None
        check_finished(exchange, max_tokens=max_tokens)
        if token_ids(exchange.lines) != solo[rid]:
            raise fail(
                f"id {rid!r}: {token_ids(exchange.lines)} in flight with others, {solo[rid]} alone"
            )
    order = [e.terminal_seq for e in (*exchanges, tok) if e is not None]
    if max_concurrency(s) > 1:  # batched: they finish as they finish
        return "3 generations (ids 'r-a', 41, 'r-c') decoded together, a tokenize and a ping"
    if order != sorted(order):
        raise fail("queued requests did not finish in the order they were sent")
    return "3 generations (ids 'r-a', 41, 'r-c'), a tokenize and a ping, routed by id"


def answered_mid_generation(s: Session) -> str:
    long = s.send(long_generate(s, PROMPT))
    s.wait_tokens(long)
    probes = [
        s.send({"cmd": "ping", "id": s.fresh_id("mid")}),
        s.send({"cmd": "hello", "id": s.fresh_id("mid")}),
        s.send({"cmd": "info", "id": s.fresh_id("mid")}),
    ]
    assert long is not None
    s.cancel(long.id)
    s.wait(*probes, long)
    check_cancelled(long)
    late = [p.cmd for p in probes if p is not None and p.terminal_seq > long.terminal_seq]
    if late:
        raise fail(
            f"{late} were answered only after the generation ended (they are answered at once)"
        )
    return "ping, hello and info answered between tokens"


def failed_loads_keep_the_model(s: Session) -> str:
    before = _facts(s)["path"]
    rid = s.fresh_id("missing")
    missing = s.call({"cmd": "load", "id": rid, "path": MISSING_PATH, "mock": MISSING_MOCK})
    s.expect(
        missing, {"type": "error", "id": rid, "code": "model_not_found"}, f"load of {MISSING_PATH}"
    )
    empty = s.scratch / "not-a-model"
    empty.mkdir(exist_ok=True)
    (empty / "README.txt").write_text("not a model\n", encoding="utf-8")
    rid = s.fresh_id("notmodel")
    bad = s.call({"cmd": "load", "id": rid, "path": str(empty), "mock": NOT_A_MODEL_MOCK})
    s.expect(
        bad,
        {"type": "error", "id": rid, "code": "load_failed"},
        "load of a directory without config.json",
    )
    reply = s.call({"cmd": "info", "id": s.fresh_id("info")})
    if reply.get("type") != "info" or reply.get("path") != before:
        raise fail(
            f"after loads that failed before unloading, the model should still be {before}: {reply}"
        )
    return "model_not_found, load_failed; the model stayed loaded"


def unload(s: Session) -> str:
    rid = s.fresh_id("unload")
    reply = s.call({"cmd": "unload", "id": rid})
    s.expect(reply, {"type": "unloaded", "id": rid, "ok": True, "was_loaded": True}, "unload")
    for request in (
        {"cmd": "generate", "prompt": "x"},
        {"cmd": "info"},
        {"cmd": "inspect", "prompt": "x"},
    ):
        rid = s.fresh_id("after-unload")
        error = s.call({**request, "id": rid})
        s.expect(
            error,
            {"type": "error", "id": rid, "code": "no_model"},
            f"{request['cmd']} after unload",
        )
    again = s.call({"cmd": "unload", "id": s.fresh_id("unload")})
    s.expect(again, {"type": "unloaded", "was_loaded": False}, "a second unload")
    hello = s.call({"cmd": "hello", "id": s.fresh_id("hello")})
    s.expect(hello, {"model": None}, "hello after unload")
    load(s)
    return "was_loaded true then false; no_model after; reloaded"


GROUP = Group(
    name="model",
    about="every command with the model loaded (addressed)",
    model=True,
    cases=(
        Case(name="load: loaded, hello names the model", run=load),
        Case(name="generate: tokens then done", run=generate),
        Case(name="chat: template, parts, kwargs", run=chat),
        Case(name="greedy decoding is deterministic", run=greedy_is_deterministic),
        Case(name="stop strings cut the text", run=stop_strings),
        Case(name="sampling options accepted, seeded", run=sampling_options),
        Case(name="logprobs", run=logprobs),
        Case(name="tokenize / detokenize", run=tokenize_detokenize),
        Case(name="inspect: attention files of the model's shapes", run=inspect),
        Case(name="info matches loaded", run=info),
        Case(name="image part to a text model", run=vision_refused),
        Case(name="concurrent requests routed by id", run=routing_by_id),
        Case(name="ping/hello/info answered mid-stream", run=answered_mid_generation),
        Case(name="failed loads keep the model", run=failed_loads_keep_the_model),
        Case(name="unload, then no_model, reload", run=unload),
    ),
)
