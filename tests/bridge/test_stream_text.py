"""A stream's token texts join up to exactly ``detokenize`` of its token ids.

mlx-lm's BPE streaming detokenizer dropped the first token's leading space
(``"Once upon a time"`` streamed ``"time time …"`` while ``detokenize`` gave
``" time time …"``). The worker now writes each token's text with
:mod:`bridge.engines.detokenizer`, over the tokenizer's own ``decode``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.engines.detokenizer import MAX_PENDING, IncrementalDetokenizer, for_tokenizer
from tests.harness import Line, WorkerProcess, text_of, token_ids

PROMPTS = [
    "Once upon a time",
    "def main():",
    "import sys\n\nclass Reader:",
    "The quick brown fox",
    "Hello",
    " leading space",
    "x = 1\n",
    "for i in range(10):\n    ",
    "# comment",
    "return",
    '"""Docstring',
    "if __name__ == '__main__':",
    "a, b = b, a",
    "print(",
    "raise ValueError(",
    "   indented",
    "while True:",
    "try:\n    pass\nexcept",
    "lambda x:",
    "{'key': 'value'}",
    "self.",
    "@property\ndef",
    "10 + 20 =",
    "é à ü",
    "with open(path) as f:",
    "yield from",
    "async def run(",
    "class Error(Exception):",
    "import os, re",
    "\n\n",
]
MESSAGES = [[{"role": "user", "content": p}] for p in PROMPTS[:15]] + [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": p}]
    for p in PROMPTS[15:]
]


def detokenized(worker: WorkerProcess, ids: list[int], eos: set[int]) -> str:
    reply = worker.call(
        {"cmd": "detokenize", "id": "d", "tokens": [i for i in ids if i not in eos]}
    )
    assert reply["type"] == "text", reply
    text: str = reply["text"]
    return text


def mismatches(
    worker: WorkerProcess, requests: list[dict[str, Any]], eos: set[int]
) -> list[tuple[str, str]]:
    bad = []
    for request in requests:
        lines = worker.request(request)
        assert lines[-1]["type"] == "done", lines[-1]
        ids = token_ids(lines)
        streamed = "".join(
            t["token"] for t in lines if t["type"] == "token" and t["token_id"] not in eos
        )
        expected = detokenized(worker, ids, eos)
        if streamed != expected:
            bad.append((streamed, expected))
    return bad


def eos_ids(model: Path) -> set[int]:
    config = json.loads((model / "config.json").read_text())
    ids = config.get("eos_token_id") or config.get("text_config", {}).get("eos_token_id") or []
    return set(ids if isinstance(ids, list) else [ids])


@pytest.fixture(scope="module")
def eos(tiny_model: Path) -> set[int]:
    return eos_ids(tiny_model)


def test_once_upon_a_time_keeps_the_first_space(loaded_worker: WorkerProcess) -> None:
    lines = loaded_worker.request(
        {"cmd": "generate", "id": "o", "prompt": "Once upon a time", "max_tokens": 8}
    )
    reply = loaded_worker.call({"cmd": "detokenize", "id": "d", "tokens": token_ids(lines)})
    assert text_of(lines) == reply["text"]


@pytest.mark.parametrize("max_tokens", [16, 32])
def test_generate_streams_the_detokenized_text(
    loaded_worker: WorkerProcess, eos: set[int], max_tokens: int
) -> None:
    requests = [
        {"cmd": "generate", "id": f"g{i}", "prompt": p, "max_tokens": max_tokens}
        for i, p in enumerate(PROMPTS)
    ]
    assert mismatches(loaded_worker, requests, eos) == []


@pytest.mark.parametrize("max_tokens", [16, 32])
def test_chat_streams_the_detokenized_text(
    loaded_worker: WorkerProcess, eos: set[int], max_tokens: int
) -> None:
    requests = [
        {"cmd": "chat", "id": f"c{i}", "messages": m, "max_tokens": max_tokens}
        for i, m in enumerate(MESSAGES)
    ]
    assert mismatches(loaded_worker, requests, eos) == []


def test_sampled_and_eos_ended_streams_too(loaded_worker: WorkerProcess, eos: set[int]) -> None:
    sampled = [
        {
            "cmd": "generate",
            "id": f"s{i}",
            "prompt": p,
            "max_tokens": 24,
            "temperature": 1.5,
            "seed": i,
        }
        for i, p in enumerate(PROMPTS[:10])
    ]
    # EOS as the first token: the stream ends with no text at all
    ended = [
        {
            "cmd": "generate",
            "id": "e",
            "prompt": "Hello",
            "max_tokens": 10,
            "logit_bias": {str(min(eos)): 1000},
        }
    ]
    assert mismatches(loaded_worker, sampled + ended, eos) == []


def test_the_legacy_dialect_writes_one_line_per_token(loaded_worker: WorkerProcess) -> None:
    lines = loaded_worker.request(
        {"cmd": "generate", "prompt": "Once upon a time", "max_tokens": 6}
    )
    tokens = [line for line in lines if "done" not in line]
    assert len(tokens) == 6
    reply = loaded_worker.call({"cmd": "detokenize", "id": "d", "tokens": token_ids(lines)})
    assert text_of(lines) == reply["text"]


def test_stop_strings_cut_the_same_text(loaded_worker: WorkerProcess) -> None:
    first = loaded_worker.request(
        {"cmd": "generate", "id": "a", "prompt": "Once upon a time", "max_tokens": 12}
    )
    full = text_of(first)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), full
    lines = loaded_worker.request(
        {"cmd": "generate", "id": "b", "prompt": "Once upon a time", "max_tokens": 12, "stop": stop}
    )
    assert lines[-1]["finish_reason"] == "stop_sequence"
    assert text_of(lines) == full[: full.index(stop)]


# -- the detokenizer, in process, over the fixture's real tokenizer -------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


def streamed(detokenizer: IncrementalDetokenizer, ids: list[int]) -> str:
    return "".join(detokenizer.add(i) for i in ids) + detokenizer.finish()


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_ids_join_up_to_decode(tokenizer: Any, data: st.DataObject) -> None:
    vocab = len(tokenizer)
    ids = data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=40))
    assert streamed(for_tokenizer(tokenizer), ids) == tokenizer.decode(ids)


def test_a_character_split_over_byte_tokens_waits_for_its_last_byte(tokenizer: Any) -> None:
    ids = tokenizer.encode(" 日本", add_special_tokens=False)
    assert len(ids) > 2  # byte tokens: the fixture's vocabulary has no CJK
    detokenizer = for_tokenizer(tokenizer)
    pieces = [detokenizer.add(i) for i in ids]
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) + detokenizer.finish() == " 日本"


def test_stray_bytes_are_written_after_max_pending(tokenizer: Any) -> None:
    lone = tokenizer.encode("é", add_special_tokens=False)[0]  # a lead byte alone
    ids = [lone] * (MAX_PENDING * 3)
    detokenizer = for_tokenizer(tokenizer)
    written = "".join(detokenizer.add(i) for i in ids)
    assert written  # not held back forever
    assert written + detokenizer.finish() == tokenizer.decode(ids)


# -- decoders with start-of-text and clean-up rules (fakes of the decode seam) --------

VOCAB = ["▁Hello", "▁world", "▁.", "▁n't", "▁'s", "▁,", "▁", "x", "▁it", "?"]


def spm_decode(ids: list[int]) -> str:
    """SentencePiece's: pieces joined, ``▁`` as space, the first space dropped."""
    text = "".join(VOCAB[i] for i in ids).replace("▁", " ")
    return text[1:] if text.startswith(" ") else text


def cleanup_decode(ids: list[int]) -> str:
    """Like transformers' ``clean_up_tokenization`` over SentencePiece pieces."""
    text = spm_decode(ids)
    for old, new in [
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ]:
        text = text.replace(old, new)
    return text


@pytest.mark.parametrize(
    ("decode", "cleans"), [(spm_decode, False), (cleanup_decode, True)], ids=["spm", "cleanup"]
)
@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.integers(0, len(VOCAB) - 1), min_size=1, max_size=30))
def test_decoders_that_rewrite_join_up_to_decode(
    decode: Callable[[list[int]], str], cleans: bool, ids: list[int]
) -> None:
    assert streamed(IncrementalDetokenizer(decode, cleans_spaces=cleans), ids) == decode(ids)


def test_clean_up_holds_back_only_what_may_change() -> None:
    detokenizer = IncrementalDetokenizer(cleanup_decode, cleans_spaces=True)
    assert detokenizer.add(0) == "Hello"
    assert detokenizer.add(2) == "."  # "▁." decodes as " ." but cleans up to "."
    assert detokenizer.add(6) == ""  # " " may vanish if "." follows
    assert detokenizer.add(7) == " x"


# -- the vision engine streams through the same detokenizer ----------------------------


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("mlx_vlm")
    from bridge.demo import vlm as demo_vlm

    return demo_vlm.ensure(tmp_path_factory.mktemp("models") / "tiny-vlm")


@pytest.fixture(scope="module")
def vlm_worker(tiny_vlm: Path) -> Iterator[WorkerProcess]:
    with WorkerProcess("bridge") as worker:
        loaded = worker.call({"cmd": "load", "path": str(tiny_vlm), "id": "setup"}, timeout=120)
        assert loaded["type"] == "loaded", loaded
        yield worker


def test_the_vision_engine_streams_the_detokenized_text(
    vlm_worker: WorkerProcess, tiny_vlm: Path
) -> None:
    requests: list[dict[str, Any]] = [
        {"cmd": "generate", "id": f"g{i}", "prompt": p, "max_tokens": 16}
        for i, p in enumerate(PROMPTS[:10])
    ] + [
        {"cmd": "chat", "id": f"c{i}", "messages": m, "max_tokens": 16}
        for i, m in enumerate(MESSAGES[:10])
    ]
    info: Line = vlm_worker.call({"cmd": "info", "id": "i"})
    assert info["vision"] is True
    assert mismatches(vlm_worker, requests, eos_ids(tiny_vlm)) == []
