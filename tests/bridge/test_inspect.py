"""Attention capture for ``inspect``: the real tiny qwen3 model, in process
and over the wire.

The files hold what the model really computed: the keys equal what the KV
cache keeps after a prefill, and layer 0's queries equal a recomputation
from the layer's weights. Over the wire, a real ``python -m bridge`` answers
``inspect`` in both dialects with the model's figures and writes the same
files.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.models.cache import make_prompt_cache

from bridge.engines.text.inspect_attention import (
    DIR_PREFIX,
    InspectError,
    capture_attention,
    inspect_prompt,
)
from tests.harness import Line, WorkerProcess

PROMPT = "def fibonacci(n): return n if n < 2 else fibonacci(n - 1)"


@pytest.fixture(scope="module")
def loaded(tiny_model: Path) -> Iterator[tuple[Any, Any]]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        model, tokenizer = mlx_lm.load(str(tiny_model))[:2]
    yield model, tokenizer


def read_f32(path: Path, shape: tuple[int, ...]) -> mx.array:
    data = path.read_bytes()
    count = len(data) // 4
    assert count == shape[0] * shape[1] * shape[2], f"{path.name}: {count} floats for {shape}"
    return mx.array(struct.unpack(f"<{count}f", data)).reshape(shape)


def test_shapes_match_the_model_config(
    loaded: tuple[Any, Any], tiny_model: Path, tmp_path: Path
) -> None:
    model, tokenizer = loaded
    config = json.loads((tiny_model / "config.json").read_text())
    capture = inspect_prompt(model, tokenizer, PROMPT, architecture="qwen3", directory=tmp_path)
    seq_len = len(tokenizer.encode(PROMPT))
    assert capture.num_layers == config["num_hidden_layers"]
    assert capture.num_q_heads == config["num_attention_heads"]
    assert capture.num_kv_heads == config["num_key_value_heads"]
    assert capture.head_dim == config["head_dim"]
    assert capture.seq_len == seq_len and capture.architecture == "qwen3"
    names = sorted(p.name for p in tmp_path.iterdir())
    layers = range(config["num_hidden_layers"])
    assert names == sorted(
        ["inspect.json"]
        + [f"keys_{i:02d}.bin" for i in layers]
        + [f"queries_{i:02d}.bin" for i in layers]
    )
    for i in layers:
        q_bytes = (tmp_path / f"queries_{i:02d}.bin").stat().st_size
        k_bytes = (tmp_path / f"keys_{i:02d}.bin").stat().st_size
        assert q_bytes == 4 * capture.num_q_heads * seq_len * capture.head_dim
        assert k_bytes == 4 * capture.num_kv_heads * seq_len * capture.head_dim
    layout = json.loads((tmp_path / "inspect.json").read_text())
    assert layout["queries_shape"] == [config["num_attention_heads"], seq_len, config["head_dim"]]
    assert layout["dir"] == str(tmp_path) and layout["dtype"] == "float32"


def test_keys_are_the_cached_keys_and_queries_are_recomputed(
    loaded: tuple[Any, Any], tmp_path: Path
) -> None:
    model, tokenizer = loaded
    tokens = tokenizer.encode(PROMPT)
    capture = capture_attention(model, tokens, architecture="qwen3", directory=tmp_path)
    cache = make_prompt_cache(model)
    model(mx.array([tokens]), cache=cache)
    kv_shape = (capture.num_kv_heads, capture.seq_len, capture.head_dim)
    for i, layer_cache in enumerate(cache):
        keys = read_f32(tmp_path / f"keys_{i:02d}.bin", kv_shape)
        assert mx.allclose(keys, layer_cache.state[0][0, :, : capture.seq_len], atol=1e-5)
    # layer 0's queries, the way qwen3's attention computes them
    layer = model.model.layers[0]
    attn = layer.self_attn
    x = layer.input_layernorm(model.model.embed_tokens(mx.array([tokens])))
    q = attn.q_norm(attn.q_proj(x).reshape(1, len(tokens), attn.n_heads, -1)).transpose(0, 2, 1, 3)
    expected = attn.rope(q)[0]
    queries = read_f32(
        tmp_path / "queries_00.bin", (capture.num_q_heads, capture.seq_len, capture.head_dim)
    )
    assert mx.allclose(queries, expected, atol=1e-4)


def test_the_model_is_unchanged_afterwards(loaded: tuple[Any, Any], tmp_path: Path) -> None:
    model, tokenizer = loaded
    ropes = [layer.self_attn.rope for layer in model.model.layers]
    tokens = tokenizer.encode("hello world")
    before = model(mx.array([tokens]))
    capture_attention(model, tokens, architecture="qwen3", directory=tmp_path)
    assert [layer.self_attn.rope for layer in model.model.layers] == ropes
    assert mx.array_equal(model(mx.array([tokens])), before)


def test_a_default_directory_is_private_and_new(loaded: tuple[Any, Any]) -> None:
    model, tokenizer = loaded
    capture = inspect_prompt(model, tokenizer, "x", architecture="qwen3")
    try:
        assert capture.directory.name.startswith("mlx-bridge-inspect-")
        assert capture.directory.stat().st_mode & 0o077 == 0
        assert (capture.directory / "keys_00.bin").is_file()
    finally:
        for path in capture.directory.iterdir():
            path.unlink()
        capture.directory.rmdir()


def test_go_mlx_instance_hooks_capture_nothing(loaded: tuple[Any, Any]) -> None:
    """Why go-mlx's bridge fails: an instance's ``__call__`` is never called."""
    model, tokenizer = loaded
    attn = model.model.layers[0].self_attn
    calls: list[object] = []
    attn.__call__ = lambda *a, **k: calls.append(a)
    try:
        model(mx.array([tokenizer.encode("hello")]))
    finally:
        del attn.__call__
    assert calls == []


def test_empty_prompt_is_refused(loaded: tuple[Any, Any]) -> None:
    with pytest.raises(InspectError, match="zero tokens"):
        capture_attention(loaded[0], [], architecture="qwen3")


# -- over the wire ------------------------------------------------------------------------


def check_files(reply: Line) -> None:
    """One queries and one keys file per layer, of float32 ``[heads, seq_len, head_dim]``."""
    directory = Path(reply["dir"])
    per_head = 4 * reply["seq_len"] * reply["head_dim"]
    for i in range(reply["num_layers"]):
        assert (directory / f"queries_{i:02d}.bin").stat().st_size == reply[
            "num_q_heads"
        ] * per_head
        assert (directory / f"keys_{i:02d}.bin").stat().st_size == reply["num_kv_heads"] * per_head
    layout = json.loads((directory / "inspect.json").read_text())
    assert layout["dir"] == reply["dir"] and layout["seq_len"] == reply["seq_len"]


def test_inspect_addressed_matches_the_config_and_the_model(
    loaded_worker: WorkerProcess, loaded: tuple[Any, Any], tiny_model: Path, tmp_path: Path
) -> None:
    config = json.loads((tiny_model / "config.json").read_text())
    target = tmp_path / "not" / "there" / "yet"
    reply = loaded_worker.call(
        {"cmd": "inspect", "id": "in1", "prompt": PROMPT, "dir": str(target)}
    )
    seq_len = len(loaded[1].encode(PROMPT))
    assert reply == {
        "type": "inspected",
        "id": "in1",
        "ok": True,
        "dir": str(target),
        "num_layers": config["num_hidden_layers"],
        "num_kv_heads": config["num_key_value_heads"],
        "num_q_heads": config["num_attention_heads"],
        "seq_len": seq_len,
        "head_dim": config["head_dim"],
        "architecture": "qwen3",
    }
    check_files(reply)
    # the worker's files hold what the model computes in this process
    here = capture_attention(
        loaded[0], loaded[1].encode(PROMPT), architecture="qwen3", directory=tmp_path / "here"
    )
    for name in ("queries_00.bin", "keys_01.bin"):
        heads = here.num_q_heads if name.startswith("queries") else here.num_kv_heads
        shape = (heads, seq_len, here.head_dim)
        theirs, ours = read_f32(target / name, shape), read_f32(here.directory / name, shape)
        assert mx.allclose(theirs, ours, atol=1e-5)


def test_inspect_legacy_writes_a_new_temporary_directory(loaded_worker: WorkerProcess) -> None:
    reply = loaded_worker.call({"cmd": "inspect", "prompt": "hello world"})
    directory = Path(reply["dir"])
    try:
        assert "id" not in reply and reply["type"] == "inspected" and reply["ok"] is True
        assert directory.parent == Path(tempfile.gettempdir())
        assert directory.name.startswith(DIR_PREFIX)
        tokens = loaded_worker.call({"cmd": "tokenize", "text": "hello world"})["tokens"]
        assert reply["num_layers"] == 2 and reply["seq_len"] == len(tokens)
        check_files(reply)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_inspect_refusals_with_a_model(loaded_worker: WorkerProcess, tmp_path: Path) -> None:
    empty = loaded_worker.call({"cmd": "inspect", "id": "e", "prompt": ""})
    assert empty["code"] == "invalid_request" and empty["error"] == "prompt: encodes to zero tokens"
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    bad_dir = loaded_worker.call(
        {"cmd": "inspect", "id": "d", "prompt": "x", "dir": str(blocker / "sub")}
    )
    assert bad_dir["code"] == "invalid_request" and bad_dir["error"].startswith("dir: ")
    legacy = loaded_worker.call({"cmd": "inspect", "prompt": ""})
    assert "id" not in legacy and legacy["code"] == "invalid_request"


def test_inspect_without_a_model_and_bad_requests() -> None:
    with WorkerProcess("bridge") as worker:
        for request in (
            {"cmd": "inspect", "id": 1, "prompt": "x"},
            {"cmd": "inspect", "prompt": "x"},
        ):
            reply = worker.call(request)
            assert reply["type"] == "error" and reply["code"] == "no_model"
            assert reply.get("id") == request.get("id")
        missing = worker.call({"cmd": "inspect", "id": "m"})
        assert missing == {
            "type": "error",
            "id": "m",
            "error": "prompt: required",
            "code": "invalid_request",
        }
        assert worker.call({"cmd": "inspect"})["error"] == "prompt: required"
        wrong = worker.call({"cmd": "inspect", "id": "w", "prompt": 5})
        assert wrong["error"] == "prompt: must be a string, got a number"
        empty_dir = worker.call({"cmd": "inspect", "id": "dd", "prompt": "x", "dir": ""})
        assert empty_dir["error"] == "dir: must not be empty"
        hello = worker.call({"cmd": "hello", "id": "h"})
        assert "inspect" in hello["commands"]
