"""Every command, in both dialects, against a real worker and the tiny model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.harness import WorkerProcess, text_of, token_ids

CHAT = [{"role": "user", "content": "Write a function."}]


def test_hello_and_ping_in_both_dialects(loaded_worker: WorkerProcess) -> None:
    hello = loaded_worker.call({"cmd": "hello", "id": 1})
    assert hello["type"] == "hello" and hello["id"] == 1
    assert hello["protocol_version"] == 1
    assert set(hello["versions"]) >= {"bridge", "mlx", "mlx-lm"}
    vlm_installed = importlib.util.find_spec("mlx_vlm") is not None
    assert ("mlx-vlm" in hello["versions"]) == vlm_installed
    assert "generate" in hello["commands"] and "cancel" in hello["commands"]
    assert hello["limits"]["max_line_bytes"] == 64 * 1024 * 1024
    assert hello["model"] is not None
    legacy = loaded_worker.call({"cmd": "hello"})
    assert legacy["type"] == "hello" and "id" not in legacy
    assert loaded_worker.call({"cmd": "ping", "id": "p"}) == {"type": "pong", "id": "p", "ok": True}
    assert loaded_worker.call({"cmd": "ping"}) == {"type": "pong", "ok": True}


def test_generate_addressed_streams_tokens_then_done(loaded_worker: WorkerProcess) -> None:
    lines = loaded_worker.request(
        {"cmd": "generate", "id": "g", "prompt": "def f(", "max_tokens": 12}
    )
    tokens, done = lines[:-1], lines[-1]
    assert len(tokens) == 12 and all(t["type"] == "token" and t["id"] == "g" for t in tokens)
    assert done["type"] == "done" and done["done"] is True
    assert done["finish_reason"] == "length"
    assert done["tokens_generated"] == 12
    assert done["prompt_tokens"] > 0
    assert done["ttft_ms"] > 0 and done["generation_tps"] > 0 and done["prompt_tps"] > 0
    assert done["peak_memory_bytes"] > 0


def test_generate_legacy_has_go_mlx_shapes(loaded_worker: WorkerProcess) -> None:
    lines = loaded_worker.request({"cmd": "generate", "prompt": "import os", "max_tokens": 5})
    for line in lines[:-1]:
        assert isinstance(line["token"], str) and isinstance(line["token_id"], int)
        assert "id" not in line
    assert lines[-1]["done"] is True and lines[-1]["tokens_generated"] == 5


def test_chat_applies_template_and_kwargs(loaded_worker: WorkerProcess) -> None:
    lines = loaded_worker.request(
        {
            "cmd": "chat",
            "id": 7,
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hello"}]},
            ],
            "max_tokens": 6,
            "chat_template_kwargs": {"enable_thinking": False},
        }
    )
    assert lines[-1]["finish_reason"] == "length" and len(lines) == 7
    prompt = loaded_worker.call(
        {"cmd": "tokenize", "id": "t", "text": "<|im_start|>system\nbe brief<|im_end|>\n"}
    )
    # the templated prompt holds the system turn, the user turn and the generation prompt
    assert lines[-1]["prompt_tokens"] > len(prompt["tokens"])


def test_chat_legacy(loaded_worker: WorkerProcess) -> None:
    lines = loaded_worker.request({"cmd": "chat", "messages": CHAT, "max_tokens": 3})
    assert [line["type"] for line in lines] == ["token"] * 3 + ["done"]


def test_info_reports_real_architecture_and_memory(loaded_worker: WorkerProcess) -> None:
    for request in ({"cmd": "info", "id": "i"}, {"cmd": "info"}):
        info = loaded_worker.call(request)
        assert info["type"] == "info"
        assert info["model_type"] == "qwen3"
        assert info["layers"] == 2 and info["hidden_size"] == 64
        assert info["num_attention_heads"] == 4 and info["num_key_value_heads"] == 2
        assert info["head_dim"] == 16 and info["vocab_size"] >= 2048
        assert info["context_len"] == 4096 and info["dtype"] == "float32"
        memory = info["memory"]
        assert memory["active_bytes"] > 0 and memory["rss_bytes"] > 10 * 2**20
        assert memory["peak_bytes"] >= memory["active_bytes"]


def test_tokenize_detokenize_round_trip(loaded_worker: WorkerProcess) -> None:
    text = "def main():\n    return 42"
    tokens = loaded_worker.call({"cmd": "tokenize", "id": 1, "text": text})["tokens"]
    assert tokens and all(isinstance(t, int) for t in tokens)
    assert loaded_worker.call({"cmd": "detokenize", "id": 2, "tokens": tokens})["text"] == text
    legacy = loaded_worker.call({"cmd": "tokenize", "text": text})
    assert legacy["tokens"] == tokens
    bad = loaded_worker.call({"cmd": "detokenize", "id": 3, "tokens": [10**9]})
    assert bad["code"] == "invalid_request" and bad["error"].startswith("tokens[0]:")


def test_sampling_options_work(loaded_worker: WorkerProcess) -> None:
    base = {"cmd": "generate", "prompt": "class A:", "max_tokens": 16}
    sampled = {**base, "temperature": 0.9, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "seed": 7}
    first = token_ids(loaded_worker.request({**sampled, "id": "s1"}))
    second = token_ids(loaded_worker.request({**sampled, "id": "s2"}))
    assert first == second and len(first) == 16  # same seed, same tokens
    penalised = loaded_worker.request({**base, "id": "r", "repeat_penalty": 1.5})
    assert penalised[-1]["finish_reason"] == "length"
    forced = token_ids(loaded_worker.request({**base, "id": "b", "logit_bias": {"300": 1000}}))
    assert forced == [300] * 16


def test_eos_ends_with_stop(loaded_worker: WorkerProcess) -> None:
    eos = loaded_worker.call({"cmd": "tokenize", "id": 0, "text": "<|im_end|>"})["tokens"]
    assert len(eos) == 1
    lines = loaded_worker.request(
        {
            "cmd": "generate",
            "id": "e",
            "prompt": "x",
            "max_tokens": 50,
            "logit_bias": {str(eos[0]): 1000},
        }
    )
    assert lines[-1]["finish_reason"] == "stop"
    assert lines[-1]["tokens_generated"] == 0
    assert eos[0] not in token_ids(lines)


def test_logprobs_top_n(loaded_worker: WorkerProcess) -> None:
    lines = loaded_worker.request(
        {"cmd": "generate", "id": "lp", "prompt": "for i in", "max_tokens": 4, "logprobs": 3}
    )
    for line in lines[:-1]:
        top = line["top_logprobs"]
        assert len(top) == 3
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert top[0]["token_id"] == line["token_id"]  # greedy picks the best
        assert line["logprob"] == pytest.approx(top[0]["logprob"])


def test_stop_string_spanning_tokens_is_never_emitted(loaded_worker: WorkerProcess) -> None:
    request = {"cmd": "generate", "prompt": "def run(self):", "max_tokens": 40}
    full = loaded_worker.request({**request, "id": "full"})
    pieces = [line["token"] for line in full[:-1]]
    # a stop string that starts inside token 5 and ends inside a later token
    start = len("".join(pieces[:5])) + len(pieces[5]) // 2
    text = "".join(pieces)
    stop = text[start : start + 4]
    assert len(stop) == 4 and text.find(stop) == start, "fixture output too repetitive"
    cut = loaded_worker.request({**request, "id": "cut", "stop": ["never-there", stop]})
    assert cut[-1]["finish_reason"] == "stop_sequence"
    assert text_of(cut) == text[:start]
    assert stop not in text_of(cut)


def test_stop_string_absent_keeps_all_text(loaded_worker: WorkerProcess) -> None:
    request = {"cmd": "generate", "prompt": "while True:", "max_tokens": 20}
    full = text_of(loaded_worker.request({**request, "id": 1}))
    held = loaded_worker.request({**request, "id": 2, "stop": ["\u2603never"]})
    assert text_of(held) == full and held[-1]["finish_reason"] == "length"


def test_image_part_to_text_model_is_refused(loaded_worker: WorkerProcess) -> None:
    content = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    ]
    reply = loaded_worker.call(
        {"cmd": "chat", "id": "v", "messages": [{"role": "user", "content": content}]}
    )
    assert reply["code"] == "vision_not_supported"
    assert reply["error"].startswith("messages[0].content")


def test_load_unload_and_reload(tiny_model: Path) -> None:
    with WorkerProcess("bridge") as worker:
        assert worker.call({"cmd": "generate", "id": 1, "prompt": "x"})["code"] == "no_model"
        legacy = worker.call({"cmd": "load", "path": str(tiny_model), "gpu_layers": -1})
        assert legacy["ok"] is True and "id" not in legacy
        assert legacy["model_type"] == "qwen3" and legacy["vocab_size"] >= 2048
        again = worker.call(
            {"cmd": "load", "id": "l2", "path": str(tiny_model), "context_len": 512}
        )
        assert again["type"] == "loaded" and again["context_len"] == 512
        assert again["quantization"] is None and again["dtype"] == "float32"
        lines = worker.request({"cmd": "generate", "id": "g", "prompt": "a", "max_tokens": 3})
        assert lines[-1]["finish_reason"] == "length"
        assert worker.call({"cmd": "unload", "id": "u"}) == {
            "type": "unloaded",
            "id": "u",
            "ok": True,
            "was_loaded": True,
        }
        assert worker.call({"cmd": "unload"})["was_loaded"] is False
        assert worker.call({"cmd": "info", "id": "i"})["code"] == "no_model"
        assert worker.call({"cmd": "chat", "id": 2, "messages": CHAT})["code"] == "no_model"


def test_info_waits_behind_a_queued_load(tiny_model: Path) -> None:
    with WorkerProcess("bridge") as worker:
        worker.send({"cmd": "load", "id": "l", "path": str(tiny_model)})
        worker.send({"cmd": "info", "id": "i"})
        assert worker.read()["type"] == "loaded"
        assert worker.read()["type"] == "info"


def test_memory_gate_refuses_unless_forced(tiny_model: Path) -> None:
    with WorkerProcess("bridge", ["--memory-budget", "1000"]) as worker:
        refused = worker.call({"cmd": "load", "id": 1, "path": str(tiny_model)})
        assert refused["code"] == "out_of_memory" and "force" in refused["error"]
        forced = worker.call({"cmd": "load", "id": 2, "path": str(tiny_model), "force": True})
        assert forced["type"] == "loaded"


def test_preload_with_model_flag(tiny_model: Path) -> None:
    with WorkerProcess("bridge", ["--model", str(tiny_model)]) as worker:
        lines = worker.request({"cmd": "generate", "id": 1, "prompt": "x", "max_tokens": 2})
        assert lines[-1]["type"] == "done"  # the preload's reply is never written


def test_token_ids_are_checked_against_the_vocabulary(loaded_worker: WorkerProcess) -> None:
    vocab = loaded_worker.call({"cmd": "info", "id": "v"})["vocab_size"]
    bad = loaded_worker.call(
        {"cmd": "generate", "id": "lb", "prompt": "x", "logit_bias": {str(vocab): 5}}
    )
    assert bad["code"] == "invalid_request" and "outside the vocabulary" in bad["error"]
    wide = loaded_worker.request(
        {
            "cmd": "generate",
            "id": "k",
            "prompt": "x",
            "max_tokens": 3,
            "temperature": 1,
            "top_k": vocab + 10,
        }
    )
    assert wide[-1]["finish_reason"] == "length"
    loaded_worker.send(b'{"cmd":"generate","id":"s","prompt":"x","seed":18446744073709551616}\n')
    huge_seed = loaded_worker.read()
    assert huge_seed["code"] == "invalid_request" and huge_seed["error"].startswith("seed:")


def test_load_a_repo_id_from_the_local_hub_cache(tiny_model: Path, tmp_path: Path) -> None:
    """A repo id resolves through the Hugging Face cache layout, never the network."""
    import shutil

    repo = tmp_path / "hub" / "models--acme--tiny-chat"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_model, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub")}
    with WorkerProcess("bridge", env=env) as worker:
        loaded = worker.call({"cmd": "load", "id": 1, "path": "acme/tiny-chat"})
        assert loaded["type"] == "loaded" and loaded["path"] == str(snapshot)
        missing = worker.call({"cmd": "load", "id": 2, "path": "acme/other"})
        assert missing["code"] == "model_not_found"
        adapter = worker.call(
            {"cmd": "load", "id": 3, "path": "acme/tiny-chat", "adapter_path": str(tmp_path / "no")}
        )
        assert adapter["code"] == "load_failed"
