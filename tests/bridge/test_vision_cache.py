"""The prompt cache for vision chats: keyed by the images' content as well as the tokens.

An image's placeholder tokens are the same for any image, so the slot names
the images' digest; a reused prefix must hold every image token (an image
cannot be fed in part), and the positions of the fed suffix come from the
whole prompt (mRoPE). Greedy output with a warm cache equals a cold run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.bridge.test_vision import picture
from tests.bridge.test_vision import tiny_vlm as tiny_vlm  # the session fixture
from tests.harness import WorkerProcess, token_ids


def turn(image: str | None, follow_up: bool = False) -> list[dict[str, Any]]:
    content: Any = [{"type": "text", "text": "What is this?"}]
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": image}})
    messages = [{"role": "user", "content": content}]
    if follow_up:
        messages += [
            {"role": "assistant", "content": "A colour."},
            {"role": "user", "content": "Which one?"},
        ]
    return messages


def chat(rid: str, messages: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    return {"cmd": "chat", "id": rid, "messages": messages, "max_tokens": 8, **fields}


@pytest.fixture(scope="module")
def warm(tiny_vlm: Path) -> Iterator[WorkerProcess]:
    with WorkerProcess("bridge") as w:
        assert w.call({"cmd": "load", "id": "l", "path": str(tiny_vlm)}, timeout=120)["vision"]
        yield w


@pytest.fixture(scope="module")
def cold(tiny_vlm: Path) -> Iterator[WorkerProcess]:
    with WorkerProcess("bridge", args=["--prompt-cache-entries", "0"]) as w:
        assert w.call({"cmd": "load", "id": "l", "path": str(tiny_vlm)}, timeout=120)["vision"]
        yield w


def test_a_second_turn_reuses_the_image_and_answers_as_cold(
    warm: WorkerProcess, cold: WorkerProcess
) -> None:
    red = picture("red")
    warm.request(chat("a", turn(red), cache_key="conv"))
    second = warm.request(chat("b", turn(red, True), cache_key="conv"))
    baseline = cold.request(chat("c", turn(red, True), cache_key="conv"))
    assert baseline[-1]["cached_tokens"] == 0
    assert second[-1]["cached_tokens"] > 0
    assert token_ids(second) == token_ids(baseline)
    info = warm.call({"cmd": "info", "id": "i"})
    assert info["memory"]["prompt_cache"]["entries"] >= 1


def test_other_images_do_not_reuse_the_cache(warm: WorkerProcess, cold: WorkerProcess) -> None:
    warm.request(chat("r", turn(picture("green")), cache_key="swap"))
    other = warm.request(chat("b", turn(picture("blue"), True), cache_key="swap"))
    assert other[-1]["cached_tokens"] == 0
    assert token_ids(other) == token_ids(cold.request(chat("c", turn(picture("blue"), True))))


def test_a_text_only_conversation_is_cached_too(warm: WorkerProcess, cold: WorkerProcess) -> None:
    warm.request(chat("t1", turn(None), cache_key="text"))
    second = warm.request(chat("t2", turn(None, True), cache_key="text"))
    assert second[-1]["cached_tokens"] > 0
    assert token_ids(second) == token_ids(cold.request(chat("t3", turn(None, True))))


def test_generate_on_a_vision_model_uses_the_default_slot(
    warm: WorkerProcess, cold: WorkerProcess
) -> None:
    request = {"cmd": "generate", "prompt": "Once upon a time", "max_tokens": 8}
    warm.request({**request, "id": "g1"})
    again = warm.request({**request, "id": "g2", "prompt": "Once upon a time there"})
    assert again[-1]["cached_tokens"] > 0
    assert token_ids(again) == token_ids(
        cold.request({**request, "id": "g3", "prompt": "Once upon a time there"})
    )
