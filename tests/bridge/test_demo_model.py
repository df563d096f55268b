"""The demo model builds fast, loads with real mlx-lm and decodes decisively."""

from __future__ import annotations

import os
import pathlib
import statistics
import subprocess
import sys
from collections.abc import Iterator
from typing import Any, cast

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from bridge import demo_model

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
PROMPTS = ("Hello, how are you?", "def fibonacci(n):", "The quick brown fox")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return demo_model.build(tmp_path_factory.mktemp("demo") / "model")


@pytest.fixture(scope="module")
def loaded(model_dir: pathlib.Path) -> Iterator[tuple[Any, Any]]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        model, tokenizer = mlx_lm.load(str(model_dir))[:2]
    yield model, tokenizer


def _prompt_ids(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True
    )
    return list(ids)


def _greedy(model: Any, tokenizer: Any, prompt: list[int], n: int) -> list[Any]:
    return list(
        mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=n, sampler=make_sampler(0.0))
    )


def test_directory_has_the_model_files(model_dir: pathlib.Path) -> None:
    names = {p.name for p in model_dir.iterdir()}
    assert names == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        demo_model.STAMP_NAME,
    }
    assert model_dir.is_absolute()
    assert not [p for p in model_dir.parent.iterdir() if p.name.startswith(".")]


def test_loads_as_qwen3_with_chatml_eos(loaded: tuple[Any, Any]) -> None:
    model, tokenizer = loaded
    assert model.model_type == "qwen3"
    assert model.args.num_hidden_layers == 2
    assert model.args.hidden_size == 64
    assert model.args.vocab_size % 64 == 0
    assert model.args.vocab_size >= len(tokenizer.get_vocab())
    assert model.model.embed_tokens.weight.dtype == mx.float32
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>"
    assert im_end in tokenizer.eos_token_ids
    assert tokenizer.pad_token == "<|endoftext|>"


def test_chat_template_renders_chatml(loaded: tuple[Any, Any]) -> None:
    _, tokenizer = loaded
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Hi"},
                {"type": "text", "text": " there"},
            ],
        },
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert text.endswith("<|im_start|>assistant\n")


def test_greedy_stream_is_deterministic_and_full_length(
    loaded: tuple[Any, Any],
) -> None:
    model, tokenizer = loaded
    prompt = _prompt_ids(tokenizer, PROMPTS[0])
    first = _greedy(model, tokenizer, prompt, 32)
    second = _greedy(model, tokenizer, prompt, 32)
    assert [r.token for r in first] == [r.token for r in second]
    assert len(first) == 32
    assert first[-1].finish_reason == "length"
    assert not {r.token for r in first} & set(tokenizer.eos_token_ids)
    text = "".join(r.text for r in first)
    assert text.strip()
    assert text.isascii()


def test_greedy_choices_are_decisive(loaded: tuple[Any, Any]) -> None:
    model, tokenizer = loaded
    gaps: list[float] = []
    for text in PROMPTS:
        for response in _greedy(model, tokenizer, _prompt_ids(tokenizer, text), 16):
            top2 = mx.sort(response.logprobs)[-2:]
            gaps.append(cast(float, (top2[1] - top2[0]).item()))
    assert statistics.median(gaps) > 0.5


def test_eos_is_reachable_with_a_logit_bias(loaded: tuple[Any, Any]) -> None:
    model, tokenizer = loaded
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    responses = list(
        mlx_lm.stream_generate(
            model,
            tokenizer,
            _prompt_ids(tokenizer, PROMPTS[1]),
            max_tokens=8,
            sampler=make_sampler(0.0),
            logits_processors=make_logits_processors(logit_bias={im_end: 1000.0}),
        )
    )
    assert [(r.token, r.finish_reason) for r in responses] == [(im_end, "stop")]


def test_ensure_reuses_a_current_build(tmp_path: pathlib.Path) -> None:
    path = demo_model.ensure(tmp_path / "m")
    stamp = path / demo_model.STAMP_NAME
    before = stamp.stat().st_mtime_ns
    assert demo_model.ensure(tmp_path / "m") == path
    assert stamp.stat().st_mtime_ns == before


def test_same_seed_gives_identical_files(tmp_path: pathlib.Path) -> None:
    a = demo_model.build(tmp_path / "a", seed=7)
    b = demo_model.build(tmp_path / "b", seed=7)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    rebuilt = demo_model.build(a, seed=8)
    weights = (rebuilt / "model.safetensors").read_bytes()
    assert weights != (b / "model.safetensors").read_bytes()


def test_build_refuses_to_replace_a_foreign_directory(tmp_path: pathlib.Path) -> None:
    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        demo_model.build(target)
    assert (target / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "bridge.demo_model", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_builds_then_reuses_and_writes_the_path(tmp_path: pathlib.Path) -> None:
    target = tmp_path / "cli"
    built = _cli(str(target))
    assert built.returncode == 0, built.stderr
    assert built.stdout == f"{target}\n"
    assert (target / demo_model.STAMP_NAME).is_file()
    before = (target / demo_model.STAMP_NAME).stat().st_mtime_ns
    reused = _cli(str(target))
    assert reused.returncode == 0, reused.stderr
    assert reused.stdout == f"{target}\n"
    assert (target / demo_model.STAMP_NAME).stat().st_mtime_ns == before


def test_cli_help() -> None:
    result = _cli("--help")
    assert result.returncode == 0
    assert "--force" in result.stdout
    assert "OUT_DIR" in result.stdout
