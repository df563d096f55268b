"""A model directory is untrusted: every file a loader reads is checked first.

Real workers load copies of the tiny fixture that were altered the way a
hostile or broken download would be: FIFOs where files should be, a huge or
deeply nested ``config.json``, a config that lies about the weights, lying
safetensors headers, and paths that try to leave ``--model-root``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Line, WorkerProcess

# Generous: a loaded 2-core machine; the point is "answers", not "answers fast".
PROMPT_S = 30.0


@pytest.fixture(scope="module")
def worker() -> Iterator[WorkerProcess]:
    with WorkerProcess("bridge") as w:
        yield w


def copy_model(tiny_model: Path, target: Path) -> Path:
    shutil.copytree(tiny_model, target)
    return target


def edit_config(directory: Path, **changes: Any) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def load(worker: WorkerProcess, path: Path | str, **fields: Any) -> Line:
    return worker.call({"cmd": "load", "id": "l", "path": str(path), **fields}, timeout=PROMPT_S)


def still_serving(worker: WorkerProcess, tiny_model: Path) -> None:
    assert worker.call({"cmd": "ping", "id": "p"})["type"] == "pong"
    assert load(worker, tiny_model)["type"] == "loaded"


# -- files that are not regular files -----------------------------------------------------


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_a_fifo_is_refused_at_once_and_pings_are_answered_meanwhile(
    worker: WorkerProcess, tiny_model: Path, tmp_path: Path, name: str
) -> None:
    model = copy_model(tiny_model, tmp_path / "m")
    (model / name).unlink()
    os.mkfifo(model / name)
    worker.send({"cmd": "load", "id": "fifo", "path": str(model)})
    worker.send({"cmd": "ping", "id": "during"})
    replies = {line["id"]: line for line in (worker.read(PROMPT_S), worker.read(PROMPT_S))}
    assert replies["during"]["type"] == "pong"
    refused = replies["fifo"]
    assert refused["code"] == "load_failed", refused
    assert name in refused["error"] and "FIFO" in refused["error"], refused
    still_serving(worker, tiny_model)


def test_a_directory_by_a_loader_name_is_refused(
    worker: WorkerProcess, tiny_model: Path, tmp_path: Path
) -> None:
    model = copy_model(tiny_model, tmp_path / "m")
    (model / "generation_config.json").mkdir()
    refused = load(worker, model)
    assert refused["code"] == "load_failed"
    assert "generation_config.json is a directory" in refused["error"], refused


def test_a_fifo_in_the_adapter_directory_is_refused(
    worker: WorkerProcess, tiny_model: Path, tmp_path: Path
) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    os.mkfifo(adapter / "adapter_config.json")
    (adapter / "adapters.safetensors").write_bytes(b"")
    refused = load(worker, tiny_model, adapter_path=str(adapter))
    assert refused["code"] == "load_failed", refused
    assert refused["error"].startswith("adapter_path:") and "FIFO" in refused["error"]
    still_serving(worker, tiny_model)


# -- config.json ------------------------------------------------------------------------


def test_an_oversized_config_is_not_read(
    worker: WorkerProcess, tiny_model: Path, tmp_path: Path
) -> None:
    model = copy_model(tiny_model, tmp_path / "m")
    with open(model / "config.json", "r+b") as f:
        f.truncate(64 * 2**20)  # sparse: costs no disk
    started = time.monotonic()
    refused = load(worker, model)
    assert refused["code"] == "load_failed"
    assert "config.json is 64.0 MiB, over the limit of 16.0 MiB" in refused["error"], refused
    assert time.monotonic() - started < PROMPT_S


def test_a_deeply_nested_config_is_load_failed(
    worker: WorkerProcess, tiny_model: Path, tmp_path: Path
) -> None:
    model = copy_model(tiny_model, tmp_path / "m")
    depth = 100_000
    (model / "config.json").write_text('{"a":' * depth + "1" + "}" * depth)
    refused = load(worker, model)
    assert refused["code"] == "load_failed", refused
    assert "nests deeper than 64 levels" in refused["error"]
    still_serving(worker, tiny_model)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"num_hidden_layers": 1_000_000_000},
            "config.json: num_hidden_layers is 1000000000, but the weights hold 2 layers "
            "(model.layers.0 to model.layers.1)",
        ),
        (
            {"max_position_embeddings": 10**30},
            "config.json: max_position_embeddings is about 10^30, outside the 64-bit integer",
        ),
        ({"num_hidden_layers": -1}, "config.json: num_hidden_layers must be an integer ≥ 0"),
        (
            {"hidden_size": 128},
            "config.json: hidden_size is 128, but the weights' model.embed_tokens.weight "
            "is 2048 × 64",
        ),
        (
            {"vocab_size": 4096},
            "config.json: vocab_size is 4096, but the weights' model.embed_tokens.weight "
            "has 2048 rows",
        ),
        (
            {"num_attention_heads": "4"},
            "config.json: num_attention_heads must be an integer from 1 to 16384, got '4'",
        ),
        (
            {"head_dim": 16.5},
            "config.json: head_dim must be an integer from 1 to 65536, got 16.5",
        ),
        (
            {"text_config": {"num_hidden_layers": 3}},
            "config.json: text_config.num_hidden_layers is 3, but the weights hold 2 layers",
        ),
    ],
)
def test_a_config_that_disagrees_with_the_weights_is_load_failed(
    worker: WorkerProcess,
    tiny_model: Path,
    tmp_path: Path,
    changes: dict[str, Any],
    message: str,
) -> None:
    model = copy_model(tiny_model, tmp_path / "m")
    edit_config(model, **changes)
    refused = load(worker, model)
    assert refused["code"] == "load_failed", refused
    assert refused["error"].startswith(message), refused["error"]
    assert worker.call({"cmd": "ping", "id": "p"})["type"] == "pong"


@pytest.mark.parametrize("value", [-5, 0, 4096.5, True])
def test_a_bad_max_position_embeddings_is_an_unknown_context_or_load_failed(
    worker: WorkerProcess, tiny_model: Path, tmp_path: Path, value: object
) -> None:
    """Never a reply that cannot be encoded or breaks the schema: mlx-lm
    refuses some types itself; what it accepts reads as an unknown context."""
    model = copy_model(tiny_model, tmp_path / "m")
    edit_config(model, max_position_embeddings=value)
    loaded = load(worker, model)
    if loaded["type"] == "error":
        assert loaded["code"] == "load_failed", loaded
        assert "max_position_embeddings" in loaded["error"], loaded
    else:
        expected = None
        assert loaded["context_len"] == expected, loaded
        assert worker.call({"cmd": "info", "id": "i"})["context_len"] == expected


# -- safetensors headers ----------------------------------------------------------------


def header_bytes(header: dict[str, Any], length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return (len(raw) if length is None else length).to_bytes(8, "little") + raw


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x01", "is 1 bytes, too short for safetensors"),
        (header_bytes({}, length=2**60), "safetensors header length 1152921504606846976 is"),
        (header_bytes({}, length=5000), "header length 5000 does not fit in the file of"),
        (
            header_bytes({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}),
            "w: data_offsets [0, 16] are not within the 0 data bytes",
        ),
        (
            header_bytes({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}) + bytes(8),
            "w: F32 [4] needs 16 bytes, data_offsets give 8",
        ),
        (header_bytes([1, 2]), "bad safetensors header: not a JSON object"),  # type: ignore[arg-type]
        (  # two tensors on the same bytes: the file's size would understate them
            header_bytes(
                {
                    "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                    "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                }
            )
            + bytes(16),
            "data_offsets [0, 16] overlaps another tensor",
        ),
        (
            header_bytes({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}) + bytes(8),
            "w: data_offsets [4, 8] leaves bytes 0..4",
        ),
        (
            header_bytes({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}) + bytes(8),
            "the tensors cover 4 of the 8 data bytes",
        ),
    ],
)
def test_a_lying_safetensors_header_is_load_failed(
    worker: WorkerProcess, tiny_model: Path, tmp_path: Path, data: bytes, message: str
) -> None:
    model = copy_model(tiny_model, tmp_path / "m")
    (model / "model-extra.safetensors").write_bytes(data)
    refused = load(worker, model)
    assert refused["code"] == "load_failed", refused
    assert "model-extra.safetensors" in refused["error"] and message in refused["error"], refused


def test_an_empty_tensor_with_a_huge_layer_index_proves_no_layers(
    worker: WorkerProcess, tiny_model: Path, tmp_path: Path
) -> None:
    """Layers count only from 0 without a gap, each with real weights: one
    empty ``model.layers.999999.pad`` made a million-layer config pass."""
    model = copy_model(tiny_model, tmp_path / "m")
    edit_config(model, num_hidden_layers=1_000_000, max_position_embeddings=1)
    header = {"model.layers.999999.pad": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}
    (model / "model-pad.safetensors").write_bytes(header_bytes(header))
    refused = load(worker, model)
    assert refused["code"] == "load_failed", refused
    assert "num_hidden_layers is 1000000, but the weights hold 2 layers" in refused["error"]
    assert worker.call({"cmd": "ping", "id": "p"})["type"] == "pong"


# -- request paths ----------------------------------------------------------------------


def test_unknown_user_and_nul_bytes_in_paths(worker: WorkerProcess, tiny_model: Path) -> None:
    unknown = load(worker, "~nonexistentuser/x")
    assert unknown["code"] == "model_not_found", unknown
    nul = load(worker, "/tmp/a\0b")
    assert nul["code"] == "invalid_request" and nul["error"].startswith("path:"), nul
    adapter = load(worker, tiny_model, adapter_path="/tmp/a\0b")
    assert adapter["code"] == "invalid_request", adapter
    assert adapter["error"].startswith("adapter_path:"), adapter
    long = load(worker, "/" + "x" * 5000)
    assert long["code"] == "model_not_found", long


# -- the memory gate counts the KV cache --------------------------------------------------


def test_the_memory_gate_counts_the_kv_cache(tiny_model: Path) -> None:
    # weights 0.8 MB; KV cache 512 bytes per token (2 layers × 2 heads × 16 × 2 × float32)
    with WorkerProcess("bridge", ["--memory-budget", str(8 * 2**20)]) as worker:
        assert load(worker, tiny_model)["type"] == "loaded"  # 4,096 tokens: 2 MiB
        refused = load(worker, tiny_model, context_len=100_000)
        assert refused["code"] == "out_of_memory", refused
        assert "a KV cache of 100000 tokens is 48.8 MiB" in refused["error"], refused
        assert "model weights are 803.9 KiB" in refused["error"], refused
        assert "8.0 MiB of memory is available" in refused["error"], refused
        forced = load(worker, tiny_model, context_len=100_000, force=True)
        assert forced["type"] == "loaded" and forced["context_len"] == 100_000


# -- --model-root ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rooted(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[WorkerProcess, Path, Path]]:
    base = tmp_path_factory.mktemp("rooted")
    root, outside = base / "root", base / "outside"
    root.mkdir()
    copy_model(tiny_model, root / "m")
    copy_model(tiny_model, outside)
    with WorkerProcess("bridge", ["--model-root", str(root)]) as w:
        yield w, root, outside


def test_model_root_loads_inside(rooted: tuple[WorkerProcess, Path, Path]) -> None:
    worker, root, _ = rooted
    relative = load(worker, "m")
    assert relative["type"] == "loaded" and relative["path"] == str(root / "m"), relative
    assert load(worker, root / "m")["type"] == "loaded"
    (root / "inner-link").symlink_to(root / "m")
    assert load(worker, root / "inner-link")["type"] == "loaded"


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("m/../m", "contains '..'"),
        ("{root}/../outside", "contains '..'"),
        ("{outside}", "outside the model root"),
        ("{root}/escape", "outside the model root"),
        ("{root}/m/config.json", "is not a directory"),
        ("escape/..", "contains '..'"),
    ],
)
def test_model_root_refuses_what_leaves_it(
    rooted: tuple[WorkerProcess, Path, Path], path: str, message: str
) -> None:
    worker, root, outside = rooted
    if not (root / "escape").exists():
        (root / "escape").symlink_to(outside)
    refused = load(worker, path.format(root=root, outside=outside))
    assert refused["code"] == "forbidden", refused
    assert refused["error"].startswith("path:") and message in refused["error"], refused


def test_model_root_checks_files_and_adapters(rooted: tuple[WorkerProcess, Path, Path]) -> None:
    worker, root, outside = rooted
    sneaky = root / "sneaky"
    shutil.copytree(root / "m", sneaky)
    (sneaky / "tokenizer.json").unlink()
    (sneaky / "tokenizer.json").symlink_to(outside / "tokenizer.json")
    refused = load(worker, sneaky)
    assert refused["code"] == "forbidden" and "tokenizer.json" in refused["error"], refused
    adapter = load(worker, "m", adapter_path=str(outside))
    assert adapter["code"] == "forbidden", adapter
    assert adapter["error"].startswith("adapter_path:"), adapter


def test_model_root_refuses_a_repo_cached_outside(tiny_model: Path, tmp_path: Path) -> None:
    repo = tmp_path / "hub" / "models--acme--tiny-chat"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_model, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    root = tmp_path / "root"
    root.mkdir()
    env = {"HF_HUB_CACHE": str(tmp_path / "hub")}
    with WorkerProcess("bridge", ["--model-root", str(root)], env=env) as worker:
        refused = load(worker, "acme/tiny-chat")
        assert refused["code"] == "forbidden" and "outside the model root" in refused["error"]
    with WorkerProcess("bridge", ["--model-root", str(tmp_path)], env=env) as worker:
        assert load(worker, "acme/tiny-chat")["type"] == "loaded"


def test_model_root_must_be_a_directory(tmp_path: Path) -> None:
    with WorkerProcess("bridge", ["--model-root", str(tmp_path / "none")]) as worker:
        assert worker.wait(30) == 2
    assert "--model-root" in worker.stderr_text and "is not a directory" in worker.stderr_text


# -- vision models --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("mlx_vlm")
    from bridge.demo import vlm as demo_vlm

    return demo_vlm.ensure(tmp_path_factory.mktemp("models") / "tiny-vlm")


def test_a_vision_config_that_disagrees_with_the_weights(
    worker: WorkerProcess, tiny_vlm: Path, tmp_path: Path
) -> None:
    model = copy_model(tiny_vlm, tmp_path / "v")
    config = json.loads((model / "config.json").read_text())
    config["vision_config"]["depth"] = 1_000_000_000
    (model / "config.json").write_text(json.dumps(config))
    refused = load(worker, model)
    assert refused["code"] == "load_failed", refused
    assert refused["error"].startswith(
        "config.json: vision_config.depth is 1000000000, but the weights hold 2 layers "
        "(vision_tower.blocks.0 to vision_tower.blocks.1)"
    ), refused
    os.mkfifo(model / "fifo_preprocessor_config.json")
    config["vision_config"]["depth"] = 2
    (model / "config.json").write_text(json.dumps(config))
    fifo = load(worker, model)
    assert fifo["code"] == "load_failed" and "FIFO" in fifo["error"], fifo
