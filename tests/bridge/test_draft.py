"""Speculative decoding: ``load``'s ``draft_path``, requests' ``num_draft_tokens``.

A request alone decodes on mlx-lm's ``speculative_generate_step`` when a
draft is loaded; with others in flight it batches without the draft.
Greedy output is the same token for token with and without a draft, with a
draft that always agrees (the model itself) and with one that almost never
does (another random model), alone, batched, moved between the two, and
across a prompt-cache hit.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge import demo_model
from tests.bridge.conversation import second_turn_matches
from tests.harness import WorkerProcess, token_ids

PROMPTS = ["hello world", "The quick brown fox", "1, 2, 3,"]
CHAT = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def other_draft(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same tokenizer, other random weights: its proposals are almost never taken."""
    return demo_model.ensure(tmp_path_factory.mktemp("models") / "other", seed=5)


@pytest.fixture(scope="module", params=["itself", "other"])
def drafted(
    request: pytest.FixtureRequest, tiny_model: Path, other_draft: Path
) -> Iterator[WorkerProcess]:
    draft = tiny_model if request.param == "itself" else other_draft
    with WorkerProcess("bridge") as worker:
        loaded = worker.call(
            {"cmd": "load", "id": "l", "path": str(tiny_model), "draft_path": str(draft)}
        )
        assert loaded["type"] == "loaded" and loaded["draft"] == str(draft), loaded
        yield worker


def gen(rid: str, prompt: str, **fields: Any) -> dict[str, Any]:
    return {"cmd": "generate", "id": rid, "prompt": prompt, "max_tokens": 40, **fields}


def test_greedy_alone_is_the_same_with_a_draft(
    drafted: WorkerProcess, loaded_worker: WorkerProcess
) -> None:
    for i, prompt in enumerate(PROMPTS):
        want = loaded_worker.request(gen(f"w{i}", prompt))
        got = drafted.request(gen(f"d{i}", prompt))
        assert token_ids(got) == token_ids(want), prompt
        assert got[-1]["finish_reason"] == want[-1]["finish_reason"]
        assert "draft_tokens_accepted" not in want[-1]
        assert 0 <= got[-1]["draft_tokens_accepted"] <= got[-1]["tokens_generated"]


def test_a_draft_that_agrees_is_taken(tiny_model: Path) -> None:
    with WorkerProcess("bridge") as worker:
        worker.call(
            {"cmd": "load", "id": "l", "path": str(tiny_model), "draft_path": str(tiny_model)}
        )
        done = worker.request(gen("a", PROMPTS[0], num_draft_tokens=3))[-1]
        # every step proposes 3 and the model takes them: 3 of every 4 tokens
        assert done["draft_tokens_accepted"] >= done["tokens_generated"] // 2
        none = worker.request(gen("b", PROMPTS[0], num_draft_tokens=0))[-1]
        assert none["draft_tokens_accepted"] == 0
        info = worker.call({"cmd": "info", "id": "i"})
        assert info["draft"] == str(tiny_model)


def test_chat_stop_strings_and_max_tokens_with_a_draft(
    drafted: WorkerProcess, loaded_worker: WorkerProcess
) -> None:
    chat = {"cmd": "chat", "messages": CHAT, "max_tokens": 30}
    assert token_ids(drafted.request({**chat, "id": "c1"})) == token_ids(
        loaded_worker.request({**chat, "id": "c2"})
    )
    for fields in (
        {"max_tokens": 7},
        {"stop": ["e"]},
        {"num_draft_tokens": 1},
        {"num_draft_tokens": 32},
    ):
        want = loaded_worker.request(gen("w", PROMPTS[1], **fields))
        got = drafted.request(gen("d", PROMPTS[1], **fields))
        assert token_ids(got) == token_ids(want), fields
        assert got[-1]["finish_reason"] == want[-1]["finish_reason"], fields


def test_batched_and_moved_requests_are_the_same_with_a_draft(
    drafted: WorkerProcess, loaded_worker: WorkerProcess
) -> None:
    want = {
        f"b{i}": token_ids(loaded_worker.request(gen(f"w{i}", p))) for i, p in enumerate(PROMPTS)
    }
    for i, prompt in enumerate(PROMPTS):
        drafted.send(gen(f"b{i}", prompt))
    got = drafted.collect(list(want))
    assert {rid: token_ids(lines) for rid, lines in got.items()} == want
    # alone on the draft, then joined by another (into the batch), then alone again
    drafted.send(gen("m", PROMPTS[0], max_tokens=60))
    first = drafted.read()
    assert first["type"] == "token"
    drafted.send(gen("other", PROMPTS[2], max_tokens=5))
    seen = drafted.collect(["m", "other"])
    moved = [first["token_id"], *token_ids(seen["m"])]
    assert moved == token_ids(loaded_worker.request(gen("w", PROMPTS[0], max_tokens=60)))


def test_a_conversation_cache_with_a_draft(
    drafted: WorkerProcess, loaded_worker: WorkerProcess
) -> None:
    second_turn_matches(drafted, loaded_worker, CHAT)


def test_cancel_with_a_draft(drafted: WorkerProcess) -> None:
    drafted.send(gen("long", "x", max_tokens=100_000))
    for _ in range(3):
        assert drafted.read()["type"] == "token"
    drafted.send({"cmd": "cancel", "id": "long"})
    done = drafted.read_until_terminal("long", timeout=30)[-1]
    assert done["finish_reason"] == "cancelled"
    assert drafted.call({"cmd": "ping", "id": "p"})["type"] == "pong"


@pytest.mark.parametrize("value", [-1, 33, "3", 1.5, True, [3], {"n": 3}, 2**40])
def test_hostile_num_draft_tokens(drafted: WorkerProcess, value: object) -> None:
    reply = drafted.call(gen("h", "x", num_draft_tokens=value))
    assert reply["type"] == "error" and reply["code"] == "invalid_request", reply
    assert reply["error"].startswith("num_draft_tokens"), reply["error"]
    assert drafted.call({"cmd": "ping", "id": "p"})["type"] == "pong"


def test_draft_paths_that_cannot_be_a_draft(tiny_model: Path, tmp_path: Path) -> None:
    tools = demo_model.ensure(tmp_path / "tools", template="qwen_tools")
    with WorkerProcess("bridge", args=["--model-root", str(tiny_model.parent)]) as worker:
        cases: list[tuple[dict[str, Any], str, str]] = [
            ({"draft_path": str(tools)}, "forbidden", "draft_path"),  # outside --model-root
            ({"draft_path": "/no/such/draft"}, "forbidden", "draft_path"),
            ({"draft_path": "a\u0000b"}, "invalid_request", "draft_path"),
            ({"draft_path": 5}, "invalid_request", "draft_path"),
            ({"draft_path": "../../etc"}, "forbidden", "draft_path"),
        ]
        for fields, code, field in cases:
            reply = worker.call({"cmd": "load", "id": "l", "path": str(tiny_model), **fields})
            assert reply["type"] == "error" and reply["code"] == code, (fields, reply)
            assert reply["error"].startswith(field), reply["error"]
        ok = worker.call({"cmd": "load", "id": "ok", "path": str(tiny_model)})
        assert ok["type"] == "loaded" and "draft" not in ok
    with WorkerProcess("bridge") as worker:
        reply = worker.call(
            {"cmd": "load", "id": "l", "path": str(tiny_model), "draft_path": str(tools)}
        )
        assert reply["code"] == "load_failed" and "tokenizer" in reply["error"], reply
        missing = worker.call(
            {"cmd": "load", "id": "m", "path": str(tiny_model), "draft_path": "/no/such/draft"}
        )
        assert missing["code"] == "model_not_found" and missing["error"].startswith("draft_path")
        assert worker.call({"cmd": "load", "id": "ok", "path": str(tiny_model)})["type"] == "loaded"


def test_the_kv_budget_leaves_room_for_the_draft(tiny_model: Path) -> None:
    """--memory-budget covers the model, its draft and the KV caches: the
    KV budget is what the two models' weights leave of it."""
    weights = sum(p.stat().st_size for p in tiny_model.glob("*.safetensors"))
    args = ["--memory-budget", str(2 * weights + 600 * 512)]
    with WorkerProcess("bridge", args) as worker:
        loaded = worker.call(
            {
                "cmd": "load",
                "id": "l",
                "path": str(tiny_model),
                "draft_path": str(tiny_model),
                "force": True,
            }
        )
        assert loaded["type"] == "loaded", loaded
        assert worker.request(gen("g", PROMPTS[0]))[-1]["type"] == "done"
        info = worker.call({"cmd": "info", "id": "i"})
        assert info["batch"]["kv_budget_bytes"] == 600 * 512
