"""Attention capture for ``inspect``: the real tiny qwen3 model, in process.

The files hold what the model really computed: the keys equal what the KV
cache keeps after a prefill, and layer 0's queries equal a recomputation
from the layer's weights.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.models.cache import make_prompt_cache

from bridge.inspect_attention import InspectError, capture_attention, inspect_prompt

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
