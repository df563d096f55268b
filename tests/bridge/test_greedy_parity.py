"""Greedy output through the worker equals in-process mlx_lm.stream_generate."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import WorkerProcess, text_of, token_ids

PROMPTS = ["def main():", "import sys\n\nclass Reader:", "The quick brown fox"]


@pytest.fixture(scope="module")
def in_process(tiny_model: Path):  # type: ignore[no-untyped-def]
    import mlx_lm

    return mlx_lm.load(str(tiny_model))


def reference(in_process, prompt: str | list[int], max_tokens: int) -> tuple[list[int], str]:  # type: ignore[no-untyped-def]
    from mlx_lm import stream_generate

    model, tokenizer = in_process
    ids = []
    for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
        if r.finish_reason == "stop":
            break
        ids.append(r.token)
    # the text of the ids, not mlx-lm's streamed text, which drops the first space
    return ids, tokenizer.decode(ids)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_generate_matches_in_process(loaded_worker: WorkerProcess, in_process, prompt: str) -> None:  # type: ignore[no-untyped-def]
    expected_ids, expected_text = reference(in_process, prompt, 64)
    lines = loaded_worker.request(
        {"cmd": "generate", "id": "p", "prompt": prompt, "max_tokens": 64}
    )
    assert token_ids(lines) == expected_ids
    assert text_of(lines) == expected_text
    assert lines[-1]["prompt_tokens"] == len(in_process[1].encode(prompt))


def test_chat_matches_in_process_template(loaded_worker: WorkerProcess, in_process) -> None:  # type: ignore[no-untyped-def]
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "List three modules."},
    ]
    prompt = in_process[1].apply_chat_template(messages, add_generation_prompt=True)
    expected_ids, _ = reference(in_process, prompt, 48)
    lines = loaded_worker.request(
        {"cmd": "chat", "id": "c", "messages": messages, "max_tokens": 48}
    )
    assert token_ids(lines) == expected_ids
    assert lines[-1]["prompt_tokens"] == len(prompt)
