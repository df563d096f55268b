"""Prompt-cache reuse across turns: the store on real mlx-lm caches, then the worker.

Every parity test compares a worker with the cache (the default) with one
started with ``--prompt-cache-entries 0``: greedy, token for token, on the
float32 fixture.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from bridge.engines.text.prompt_cache import PromptCacheStore
from protocol.codec import decode_request
from protocol.errors import InvalidRequest
from protocol.requests import Chat, Generate
from tests.harness import Line, WorkerProcess, text_of, token_ids
from tests.schema_check import validate_request

STDLIB = Path(os.__file__).parent
SYSTEM = (STDLIB / "textwrap.py").read_text()[:1500]  # about 450 tokens
LONG_USER = (STDLIB / "os.py").read_text()[:8000]  # about 3,300 tokens
QUESTIONS = ["Explain this module.", "Now shorten it.", "And the tests?", "Thanks. One more?"]


# -- the store, on real caches ------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> Any:
    import mlx_lm

    return mlx_lm.load(str(tiny_model))[0]


def filled(model: Any, tokens: Sequence[int], max_kv_size: int | None = None) -> list[Any]:
    """A prompt cache that has been fed ``tokens``."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache: list[Any] = make_prompt_cache(model, max_kv_size=max_kv_size)
    model(mx.array([list(tokens)]), cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def offset(cache: list[Any]) -> int:
    value: int = cache[0].offset
    return value


TEN = tuple(range(10, 20))


def test_an_empty_slot_misses() -> None:
    store = PromptCacheStore()
    reuse = store.take(None, TEN)
    assert reuse.cache is None and reuse.cached == 0


def test_an_extended_prompt_reuses_the_whole_entry(model: Any) -> None:
    store = PromptCacheStore()
    store.put(None, TEN, filled(model, TEN))
    reuse = store.take(None, TEN + (5, 6, 7))
    assert reuse.cached == 10 and reuse.cache is not None and offset(reuse.cache) == 10


def test_a_partial_match_trims_to_the_common_prefix(model: Any) -> None:
    store = PromptCacheStore()
    store.put("k", TEN, filled(model, TEN))
    reuse = store.take("k", TEN[:6] + (99, 98))
    assert reuse.cached == 6 and reuse.cache is not None and offset(reuse.cache) == 6


def test_the_same_prompt_keeps_one_token_to_feed(model: Any) -> None:
    store = PromptCacheStore()
    store.put("k", TEN, filled(model, TEN))
    reuse = store.take("k", TEN)
    assert reuse.cached == 9 and reuse.cache is not None and offset(reuse.cache) == 9


def test_no_common_prefix_misses_and_frees_the_entry(model: Any) -> None:
    store = PromptCacheStore()
    store.put("k", TEN, filled(model, TEN))
    assert store.take("k", (7, 8, 9)).cache is None
    assert store.stats.entries == 0 and store.stats.bytes == 0


def test_take_moves_the_entry_out(model: Any) -> None:
    store = PromptCacheStore()
    store.put("k", TEN, filled(model, TEN))
    assert store.stats.entries == 1 and store.stats.bytes > 0
    assert store.take("k", TEN + (1,)).cached == 10
    assert store.stats.entries == 0 and store.stats.bytes == 0
    assert store.take("k", TEN + (1,)).cache is None


def test_put_records_only_what_the_cache_holds(model: Any) -> None:
    """A prefill cut short holds fewer tokens than the prompt."""
    store = PromptCacheStore()
    store.put("k", TEN, filled(model, TEN[:4]))
    assert store.take("k", TEN).cached == 4


def test_put_trims_the_token_computed_ahead(model: Any) -> None:
    """mlx-lm feeds a sampled token before yielding it; one never yielded is trimmed."""
    store = PromptCacheStore()
    cache = filled(model, TEN)
    store.put("k", TEN[:9], cache)
    assert offset(cache) == 9
    assert store.take("k", TEN[:9] + (3,)).cached == 9


def test_slots_are_independent(model: Any) -> None:
    store = PromptCacheStore()
    for key in (None, "a", "b"):
        store.put(key, TEN, filled(model, TEN))
    assert store.stats.entries == 3
    assert store.take("a", TEN + (1,)).cached == 10
    assert store.take("c", TEN + (1,)).cached == 0
    assert store.take(None, TEN + (1,)).cached == 10


def test_least_recently_used_entries_are_evicted_first(model: Any) -> None:
    store = PromptCacheStore(max_entries=2)
    for key in ("a", "b", "c"):
        store.put(key, TEN, filled(model, TEN))
    assert store.stats.entries == 2 and store.stats.max_entries == 2
    assert store.take("a", TEN + (1,)).cached == 0
    assert store.take("c", TEN + (1,)).cached == 10


def test_the_byte_bound_evicts_and_refuses_what_cannot_fit(model: Any) -> None:
    one = sum(c.nbytes for c in filled(model, TEN))
    store = PromptCacheStore(max_bytes=2 * one)
    for key in ("a", "b", "c"):
        store.put(key, TEN, filled(model, TEN))
    assert store.stats.entries == 2 and store.stats.bytes == 2 * one
    assert store.take("a", TEN + (1,)).cached == 0
    small = PromptCacheStore(max_bytes=one - 1)
    small.put("a", TEN, filled(model, TEN))
    assert small.stats.entries == 0 and small.stats.bytes == 0


def test_zero_turns_the_cache_off(model: Any) -> None:
    for store in (PromptCacheStore(max_entries=0), PromptCacheStore(max_bytes=0)):
        assert not store.enabled
        store.put("k", TEN, filled(model, TEN))
        assert store.stats.entries == 0
        assert store.take("k", TEN + (1,)).cached == 0


def test_clear_drops_everything(model: Any) -> None:
    store = PromptCacheStore()
    store.put("k", TEN, filled(model, TEN))
    store.clear()
    assert store.stats.entries == 0 and store.stats.bytes == 0
    assert store.take("k", TEN + (1,)).cached == 0


def test_a_wrapped_rotating_cache_is_only_ever_extended(model: Any) -> None:
    """A rotating cache that has wrapped cannot be trimmed: a partial match runs cold."""
    from mlx_lm.models.cache import can_trim_prompt_cache

    tokens = tuple(range(10, 40))
    store = PromptCacheStore()
    cache = filled(model, tokens, max_kv_size=8)
    assert not can_trim_prompt_cache(cache)
    store.put("k", tokens, cache)
    assert store.take("k", tokens[:20] + (1, 2)).cache is None
    store.put("k", tokens, filled(model, tokens, max_kv_size=8))
    assert store.take("k", tokens).cache is None  # the same prompt needs one token trimmed
    store.put("k", tokens, filled(model, tokens, max_kv_size=8))
    assert store.take("k", tokens + (1, 2)).cached == len(tokens)


def test_the_store_refuses_negative_bounds() -> None:
    with pytest.raises(ValueError):
        PromptCacheStore(max_entries=-1)


# -- the wire fields -------------------------------------------------------------------------


def test_cache_key_is_read_by_generate_and_chat() -> None:
    generate = decode_request(b'{"cmd":"generate","id":1,"prompt":"x","cache_key":"conv-1"}')
    assert isinstance(generate, Generate) and generate.cache_key == "conv-1"
    chat = decode_request(
        b'{"cmd":"chat","messages":[{"role":"user","content":"x"}],"cache_key":"c"}'
    )
    assert isinstance(chat, Chat) and chat.cache_key == "c"
    plain = decode_request(b'{"cmd":"generate","prompt":"x","cache_key":null}')
    assert isinstance(plain, Generate) and plain.cache_key is None


@pytest.mark.parametrize(
    ("value", "message"),
    [("", "cache_key: must not be empty"), (5, "cache_key: must be a string, got a number")],
)
def test_a_bad_cache_key_names_the_field(value: object, message: str) -> None:
    import orjson

    line = orjson.dumps({"cmd": "generate", "id": "x", "prompt": "p", "cache_key": value})
    with pytest.raises(InvalidRequest, match=message):
        decode_request(line)
    with pytest.raises(AssertionError):
        validate_request(orjson.loads(line))


# -- through the worker ----------------------------------------------------------------------


def start(tiny_model: Path, *args: str, context_len: int | None = None) -> WorkerProcess:
    worker = WorkerProcess("bridge", args)
    load: dict[str, Any] = {"cmd": "load", "id": "load", "path": str(tiny_model)}
    if context_len is not None:
        load["context_len"] = context_len
    assert worker.call(load)["type"] == "loaded"
    return worker


@pytest.fixture(scope="module")
def warm(tiny_model: Path) -> Iterator[WorkerProcess]:
    with start(tiny_model) as worker:
        yield worker


@pytest.fixture(scope="module")
def cold(tiny_model: Path) -> Iterator[WorkerProcess]:
    with start(tiny_model, "--prompt-cache-entries", "0") as worker:
        yield worker


def chat(
    worker: WorkerProcess, messages: list[dict[str, Any]], key: str | None = None, **options: Any
) -> list[Line]:
    request: dict[str, Any] = {"cmd": "chat", "id": "c", "messages": messages, "max_tokens": 24}
    if key is not None:
        request["cache_key"] = key
    return worker.request({**request, **options})


def conversation(system: str = SYSTEM) -> list[dict[str, Any]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": QUESTIONS[0]}]


def next_turn(messages: list[dict[str, Any]], answer: str, question: str) -> list[dict[str, Any]]:
    return [
        *messages,
        {"role": "assistant", "content": answer},
        {"role": "user", "content": question},
    ]


def test_a_three_turn_conversation_equals_a_cold_run(
    warm: WorkerProcess, cold: WorkerProcess
) -> None:
    messages = conversation()
    previous_prompt = 0
    for turn in range(3):
        hot, ref = chat(warm, messages, "three-turns"), chat(cold, messages)
        assert token_ids(hot) == token_ids(ref), f"turn {turn + 1}"
        assert text_of(hot) == text_of(ref)
        done = hot[-1]
        assert ref[-1]["cached_tokens"] == 0
        # turn 1 is cold; later turns reuse at least the previous turn's prompt
        assert previous_prompt <= done["cached_tokens"] < done["prompt_tokens"]
        previous_prompt = done["prompt_tokens"]
        messages = next_turn(messages, text_of(hot), QUESTIONS[turn + 1])


def test_an_edited_history_reuses_the_common_prefix(
    warm: WorkerProcess, cold: WorkerProcess
) -> None:
    first = conversation()
    lines = chat(warm, first, "edited")
    second = next_turn(first, text_of(lines), QUESTIONS[1])
    assert chat(warm, second, "edited")[-1]["cached_tokens"] >= lines[-1]["prompt_tokens"]
    # the user rewrites their first question: the system turn still matches
    edited = [second[0], {"role": "user", "content": "Explain it again."}, *second[2:]]
    hot, ref = chat(warm, edited, "edited"), chat(cold, edited)
    assert token_ids(hot) == token_ids(ref)
    system_turn = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
    system_tokens = warm.call(
        {"cmd": "tokenize", "id": "t", "text": system_turn, "add_special_tokens": False}
    )["tokens"]
    assert len(system_tokens) <= hot[-1]["cached_tokens"] < lines[-1]["prompt_tokens"]
    assert hot[-1]["prompt_tokens"] == ref[-1]["prompt_tokens"]


def test_a_cancelled_turn_then_its_retry(warm: WorkerProcess, cold: WorkerProcess) -> None:
    """The cache holds the prompt and every token streamed before the cancel;
    the retry reuses all of it but one prompt token, with the repetition
    penalty still seeing the cached tokens."""
    messages = conversation()
    options: dict[str, Any] = {"repetition_penalty": 1.5, "repetition_context_size": 16}
    warm.send(
        {
            "cmd": "chat",
            "id": "long",
            "messages": messages,
            "cache_key": "retry",
            "max_tokens": 100000,
            **options,
        }
    )
    streamed = [warm.read() for _ in range(5)]
    warm.send({"cmd": "cancel", "id": "long"})
    rest = warm.read_until_terminal("long")
    assert rest[-1]["finish_reason"] == "cancelled"
    hot, ref = chat(warm, messages, "retry", **options), chat(cold, messages, **options)
    assert token_ids(hot) == token_ids(ref)
    assert token_ids(streamed) == token_ids(ref)[:5]
    assert hot[-1]["cached_tokens"] == hot[-1]["prompt_tokens"] - 1


def test_cancel_during_the_prefill_of_a_new_suffix(
    warm: WorkerProcess, cold: WorkerProcess
) -> None:
    """With the history cached only the new turn is prefilled, and cancel
    still lands between its chunks; the chunks done are kept for the retry."""
    first = conversation()
    answer = text_of(chat(warm, first, "prefill"))
    second = next_turn(first, answer, LONG_USER)
    warm.send({"cmd": "chat", "id": "pf", "messages": second, "cache_key": "prefill"})
    time.sleep(0.2)
    sent = time.perf_counter()
    warm.send({"cmd": "cancel", "id": "pf"})
    lines = warm.read_until_terminal("pf")
    elapsed = time.perf_counter() - sent
    done = lines[-1]
    assert lines == [done], "no token may come out of a cancelled prefill"
    assert done["finish_reason"] == "cancelled" and done["tokens_generated"] == 0
    assert elapsed < 1.0, f"cancel took {elapsed:.3f}s"
    assert 0 < done["cached_tokens"] < 1000 < done["prompt_tokens"]
    hot, ref = chat(warm, second, "prefill"), chat(cold, second)
    assert token_ids(hot) == token_ids(ref)
    # plus the chunks prefilled before the cancel, if any were (timing-dependent)
    assert hot[-1]["cached_tokens"] >= done["cached_tokens"]


def test_cache_keys_keep_several_conversations_warm(warm: WorkerProcess) -> None:
    a = conversation(system="Be terse. " * 30)
    b = conversation(system="Answer at length, with examples. " * 10)
    answers = {key: text_of(chat(warm, m, key)) for key, m in (("conv-a", a), ("conv-b", b))}
    a2 = next_turn(a, answers["conv-a"], QUESTIONS[1])
    b2 = next_turn(b, answers["conv-b"], QUESTIONS[1])
    for key, messages in (("conv-a", a2), ("conv-b", b2)):
        done = chat(warm, messages, key)[-1]
        assert done["cached_tokens"] > done["prompt_tokens"] // 2, key
    # interleaved in one slot, each conversation evicts the other
    chat(warm, a, "shared")
    chat(warm, b, "shared")
    done = chat(warm, a2, "shared")[-1]
    assert done["cached_tokens"] <= 5  # "<|im_start|>system\n"


def test_the_default_slot_serves_the_legacy_dialect(warm: WorkerProcess) -> None:
    prompt = "import sys\n\ndef main():\n"
    first = warm.request({"cmd": "generate", "prompt": prompt, "max_tokens": 8})
    second = warm.request({"cmd": "generate", "prompt": prompt + text_of(first), "max_tokens": 8})
    assert all("id" not in line for line in second)
    done = second[-1]
    assert (
        done["cached_tokens"]
        >= len(warm.call({"cmd": "tokenize", "id": "t", "text": prompt})["tokens"]) - 1
    )


def test_info_reports_the_cache_and_loading_clears_it(
    tiny_model: Path, warm: WorkerProcess
) -> None:
    chat(warm, conversation(), "info")
    stats = warm.call({"cmd": "info", "id": "i"})["memory"]["prompt_cache"]
    assert stats["entries"] >= 1 and stats["bytes"] > 0
    assert stats["max_entries"] == 8 and stats["max_bytes"] == 2 << 30
    assert warm.call({"cmd": "load", "id": "reload", "path": str(tiny_model)})["type"] == "loaded"
    stats = warm.call({"cmd": "info", "id": "i"})["memory"]["prompt_cache"]
    assert stats["entries"] == 0 and stats["bytes"] == 0
    assert chat(warm, conversation(), "info")[-1]["cached_tokens"] == 0
    assert warm.call({"cmd": "unload", "id": "u"})["was_loaded"] is True
    assert warm.call({"cmd": "load", "id": "again", "path": str(tiny_model)})["type"] == "loaded"
    assert chat(warm, conversation(), "info")[-1]["cached_tokens"] == 0


def test_the_entry_and_byte_bounds(tiny_model: Path) -> None:
    with start(tiny_model, "--prompt-cache-entries", "2") as worker:
        for key in ("a", "b", "c"):
            chat(worker, conversation(), key)
        assert worker.call({"cmd": "info", "id": "i"})["memory"]["prompt_cache"]["entries"] == 2
        assert chat(worker, conversation(), "a")[-1]["cached_tokens"] == 0  # evicted
        assert chat(worker, conversation(), "c")[-1]["cached_tokens"] > 0
    with start(tiny_model, "--prompt-cache-bytes", "4096") as worker:
        chat(worker, conversation(), "a")
        stats = worker.call({"cmd": "info", "id": "i"})["memory"]["prompt_cache"]
        assert stats == {"entries": 0, "bytes": 0, "max_entries": 8, "max_bytes": 4096}
        assert chat(worker, conversation(), "a")[-1]["cached_tokens"] == 0


def test_a_context_len_cache_never_wraps(tiny_model: Path) -> None:
    """With ``context_len`` the KV cache is a rotating one of that size, which
    cannot be trimmed once it is full. A prompt over ``context_len`` is refused
    and generation stops at a full context, so it never wraps: a retry of a
    turn that filled it runs cold, one that did not reuses it, and both equal a
    worker without the cache."""
    with start(tiny_model, context_len=128) as hot_worker:
        over = hot_worker.call({"cmd": "chat", "id": "c", "messages": conversation()})
        assert over["code"] == "context_length_exceeded"
        short = [{"role": "user", "content": QUESTIONS[0]}]
        full = chat(hot_worker, short, "rot", max_tokens=999)
        assert full[-1]["prompt_tokens"] + full[-1]["tokens_generated"] == 128
        full_retry = chat(hot_worker, short, "rot", max_tokens=999)
        part = chat(hot_worker, short, "part", max_tokens=20)
        part_retry = chat(hot_worker, short, "part", max_tokens=20)
    with start(tiny_model, "--prompt-cache-entries", "0", context_len=128) as cold_worker:
        ref = chat(cold_worker, short, max_tokens=999)
    assert full_retry[-1]["cached_tokens"] == 0
    assert token_ids(full_retry) == token_ids(full) == token_ids(ref)
    assert part_retry[-1]["cached_tokens"] == part_retry[-1]["prompt_tokens"] - 1
    assert token_ids(part_retry) == token_ids(part) == token_ids(ref)[:20]
