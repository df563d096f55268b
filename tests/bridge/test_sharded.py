"""The sharded worker: ``python -m bridge --ranks 2`` (ring backend, 127.0.0.1) on the CPU fixture.

Rank 0 speaks the protocol; rank 1 is its child and holds the other half of
every layer (tensor parallel). Greedy output must equal the one-process
worker's token for token, alone and batched; cancel, stop strings and
``max_tokens`` work as in one process; and no rank outlives the worker or
hangs it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.bridge.conversation import second_turn_matches
from tests.harness import WorkerProcess, alive_after, text_of, token_ids

LONG_PROMPT = Path(os.__file__).read_text()[:10000]  # about 3,900 tokens
PROMPTS = ["hello world", "The quick brown fox", "1, 2, 3, 4,", "def main():"]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three colours."},
]
SHARDED = ("--ranks", "2", "--backend", "ring")


def start_sharded(tiny_model: Path, *extra: str) -> WorkerProcess:
    worker = WorkerProcess("bridge", args=[*SHARDED, *extra])
    loaded = worker.call({"cmd": "load", "id": "setup", "path": str(tiny_model)}, timeout=120)
    assert loaded["type"] == "loaded", loaded
    return worker


@pytest.fixture(scope="module")
def sharded(tiny_model: Path) -> Iterator[WorkerProcess]:
    with start_sharded(tiny_model) as worker:
        yield worker


def rank_pids(worker: WorkerProcess) -> list[int]:
    info = worker.call({"cmd": "info", "id": "pids"})
    return [r["pid"] for r in info["sharding"]["ranks"]]


def gen(rid: str, prompt: str, **fields: object) -> dict[str, object]:
    return {"cmd": "generate", "id": rid, "prompt": prompt, "max_tokens": 24, **fields}


# -- the same tokens as one process -----------------------------------------------------


def test_loaded_and_info_say_how_the_model_is_sharded(
    sharded: WorkerProcess, tiny_model: Path
) -> None:
    info = sharded.call({"cmd": "info", "id": "i"})
    sharding = info["sharding"]
    assert sharding["backend"] == "ring" and sharding["mode"] == "tensor"
    assert sharding["size"] == 2
    ranks = sharding["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["pid"] == sharded.proc.pid
    assert psutil.Process(ranks[1]["pid"]).ppid() == sharded.proc.pid
    assert all(r["device"] == "cpu" and r["weights_bytes"] > 0 for r in ranks)
    assert info["num_attention_heads"] == 4  # the model's figures, not one rank's
    memory = info["memory"]["ranks"]
    assert [m["rank"] for m in memory] == [0, 1]
    assert all(m["active_bytes"] > 0 and m["rss_bytes"] > 0 for m in memory)
    loaded = sharded.call({"cmd": "load", "id": "again", "path": str(tiny_model)}, timeout=120)
    assert loaded["sharding"]["size"] == 2 and loaded["sharding"]["mode"] == "tensor"


def test_generate_alone_equals_one_process(
    sharded: WorkerProcess, loaded_worker: WorkerProcess
) -> None:
    for i, prompt in enumerate(PROMPTS):
        want = token_ids(loaded_worker.request(gen(f"one{i}", prompt)))
        got = token_ids(sharded.request(gen(f"sh{i}", prompt)))
        assert got == want, prompt


def test_chat_alone_equals_one_process(
    sharded: WorkerProcess, loaded_worker: WorkerProcess
) -> None:
    request = {"cmd": "chat", "messages": CHAT, "max_tokens": 24}
    want = loaded_worker.request({**request, "id": "c1"})
    got = sharded.request({**request, "id": "c2"})
    assert token_ids(got) == token_ids(want)
    assert got[-1]["finish_reason"] == want[-1]["finish_reason"]


def test_batched_equals_one_process_alone(
    sharded: WorkerProcess, loaded_worker: WorkerProcess
) -> None:
    """Four generations and a chat decode together on the two ranks."""
    want = {
        f"b{i}": token_ids(loaded_worker.request(gen(f"w{i}", p))) for i, p in enumerate(PROMPTS)
    }
    want["bc"] = token_ids(
        loaded_worker.request({"cmd": "chat", "id": "wc", "messages": CHAT, "max_tokens": 24})
    )
    for i, prompt in enumerate(PROMPTS):
        sharded.send(gen(f"b{i}", prompt))
    sharded.send({"cmd": "chat", "id": "bc", "messages": CHAT, "max_tokens": 24})
    got = sharded.collect(list(want))
    assert {rid: token_ids(lines) for rid, lines in got.items()} == want


def test_seeded_sampling_equals_one_process(
    sharded: WorkerProcess, loaded_worker: WorkerProcess
) -> None:
    sampled = {"temperature": 0.9, "top_p": 0.95, "seed": 1234}
    want = token_ids(loaded_worker.request(gen("s1", "Once upon", **sampled)))
    got = token_ids(sharded.request(gen("s2", "Once upon", **sampled)))
    assert got == want


def test_unseeded_sampling_keeps_the_ranks_together(sharded: WorkerProcess) -> None:
    """Each rank samples for itself from the same PRNG state: were they to
    draw different tokens, their caches would part and the next greedy
    answer would differ from the first."""
    first = token_ids(sharded.request(gen("g1", PROMPTS[0])))
    for i in range(3):
        sharded.send(gen(f"t{i}", PROMPTS[1], temperature=1.0, max_tokens=16))
    sharded.collect([f"t{i}" for i in range(3)])
    assert token_ids(sharded.request(gen("g2", PROMPTS[0]))) == first


def test_stop_strings_and_max_tokens_as_in_one_process(
    sharded: WorkerProcess, loaded_worker: WorkerProcess
) -> None:
    free = loaded_worker.request(gen("f", PROMPTS[0], max_tokens=40))
    text = text_of(free)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    want = loaded_worker.request(gen("w", PROMPTS[0], max_tokens=40, stop=[stop]))
    got = sharded.request(gen("g", PROMPTS[0], max_tokens=40, stop=[stop]))
    assert token_ids(got) == token_ids(want)
    assert got[-1]["finish_reason"] == want[-1]["finish_reason"] == "stop_sequence"
    cut = sharded.request(gen("m", PROMPTS[0], max_tokens=5))
    assert cut[-1]["finish_reason"] == "length" and len(token_ids(cut)) == 5


def test_a_conversation_reuses_its_prompt_cache_on_every_rank(
    sharded: WorkerProcess, loaded_worker: WorkerProcess
) -> None:
    second_turn_matches(sharded, loaded_worker, CHAT)


def test_a_constrained_answer_equals_one_process(
    sharded: WorkerProcess, loaded_worker: WorkerProcess
) -> None:
    """Every rank compiles the grammar and masks its own logits alike."""
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "maximum": 99}, "s": {"enum": ["a", "b"]}},
        "required": ["n", "s"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"schema": schema}}
    stopped = 0
    for i, prompt in enumerate(PROMPTS[:2]):
        request = gen(f"js{i}", prompt, max_tokens=64, response_format=fmt)
        want = loaded_worker.request(request)
        got = sharded.request(request)
        assert token_ids(got) == token_ids(want)
        assert got[-1]["finish_reason"] == want[-1]["finish_reason"]
        if got[-1]["finish_reason"] == "stop":  # both apply it, not only alike
            answer = json.loads(text_of(got))
            assert set(answer) == {"n", "s"} and answer["s"] in ("a", "b"), answer
            stopped += 1
    assert stopped >= 1


# -- cancel -------------------------------------------------------------------------------


def test_cancel_in_decode_then_the_ranks_still_agree(sharded: WorkerProcess) -> None:
    first = token_ids(sharded.request(gen("before", PROMPTS[2])))
    sharded.send(gen("long", "x", max_tokens=100000))
    for _ in range(3):
        assert sharded.read()["type"] == "token"
    sharded.send({"cmd": "cancel", "id": "long"})
    done = sharded.read_until_terminal("long", timeout=30)[-1]
    assert done["type"] == "done" and done["finish_reason"] == "cancelled"
    assert token_ids(sharded.request(gen("after", PROMPTS[2]))) == first


def test_cancel_in_prefill(sharded: WorkerProcess) -> None:
    sharded.send(gen("pf", LONG_PROMPT, max_tokens=5, progress=True))
    assert sharded.read(timeout=60)["type"] == "progress"  # the prompt is being fed
    sharded.send({"cmd": "cancel", "id": "pf"})
    lines = sharded.read_until_terminal("pf", timeout=60)
    assert not [line for line in lines if line["type"] == "token"]
    assert lines[-1]["finish_reason"] == "cancelled" and lines[-1]["tokens_generated"] == 0
    assert sharded.call({"cmd": "ping", "id": "p"})["type"] == "pong"
    assert token_ids(sharded.request(gen("ok", PROMPTS[0]))) != []


# -- refused, and still serving -----------------------------------------------------------


def test_what_a_sharded_worker_refuses(sharded: WorkerProcess, tiny_model: Path) -> None:
    inspect = sharded.call({"cmd": "inspect", "id": "in", "prompt": "hi"})
    assert inspect["code"] == "invalid_request" and "sharded" in inspect["error"]
    adapter = sharded.call(
        {"cmd": "load", "id": "ad", "path": str(tiny_model), "adapter_path": str(tiny_model)}
    )
    assert adapter["type"] == "error" and adapter["code"] in ("load_failed", "invalid_request")
    missing = sharded.call({"cmd": "load", "id": "nf", "path": "/no/such/model\u0001"})
    assert missing["type"] == "error" and missing["code"] != "internal"
    assert token_ids(sharded.request(gen("still", PROMPTS[0]))) != []


def test_reload_on_every_rank(tiny_model: Path) -> None:
    with start_sharded(tiny_model) as worker:
        first = token_ids(worker.request(gen("a", PROMPTS[1])))
        assert worker.call({"cmd": "unload", "id": "u"})["was_loaded"] is True
        assert worker.call({"cmd": "generate", "id": "n", "prompt": "x"})["code"] == "no_model"
        again = worker.call({"cmd": "load", "id": "l", "path": str(tiny_model)}, timeout=120)
        assert again["type"] == "loaded" and again["sharding"]["size"] == 2
        assert token_ids(worker.request(gen("b", PROMPTS[1]))) == first


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ranks", "0"], "--ranks"),
        (["--ranks", "-3"], "--ranks"),
        (["--ranks", "two"], "--ranks"),
        (["--ranks", "2", "--backend", "tcp"], "--backend"),
        (["--ranks", "2", "--backend", "nccl", "--shard", "pipeline"], "send/recv"),
        (["--ranks", "2", "--shard", "diagonal"], "--shard"),
        (["--ranks", "2", "--hostfile", "/no/such/hostfile"], "--hostfile"),
    ],
)
def test_bad_sharding_flags_exit_2_naming_the_flag(args: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-P", "-m", "bridge", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[]",
        '{"ssh": "a"}',
        '[{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}]',  # one host for two ranks
        '[{"ssh": "-oProxyCommand=x", "ips": ["10.0.0.1"]}, {"ssh": "b", "ips": ["10.0.0.2"]}]',
        '[{"ssh": "a\\u0000b", "ips": ["10.0.0.1"]}, {"ssh": "b", "ips": ["10.0.0.2"]}]',
        '[{"ssh": "127.0.0.1", "ips": ["not an ip"]}, {"ssh": "b", "ips": ["10.0.0.2"]}]',
        '[{"ssh": "far", "ips": ["10.0.0.1"]}, {"ssh": "b", "ips": ["10.0.0.2"]}]',
        "[" + ",".join(['{"ssh": "h", "ips": [[[[1]]]]}'] * 2) + "]",
    ],
)
def test_a_hostile_hostfile_is_refused(tmp_path: Path, content: str) -> None:
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(content)
    done = subprocess.run(
        [sys.executable, "-P", "-m", "bridge", "--ranks", "2", "--hostfile", str(hostfile)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "--hostfile" in done.stderr


# -- no rank outlives the worker, and none hangs it ---------------------------------------


def test_quit_ends_every_rank(tiny_model: Path) -> None:
    with start_sharded(tiny_model) as worker:
        pids = rank_pids(worker)
        assert worker.call({"cmd": "quit", "id": "q"})["type"] == "bye"
        assert worker.wait(10) == 0
        assert alive_after(pids, 2.0) == []


def test_end_of_input_ends_every_rank_mid_stream(tiny_model: Path) -> None:
    with start_sharded(tiny_model) as worker:
        pids = rank_pids(worker)
        worker.send(gen("long", "x", max_tokens=100000))
        assert worker.read()["type"] == "token"
        worker.close_stdin()
        assert worker.wait(10) == 0
        assert alive_after(pids, 2.0) == []


def test_sigkill_of_rank_1_mid_stream_is_rank_failed(tiny_model: Path) -> None:
    with start_sharded(tiny_model) as worker:
        pids = rank_pids(worker)
        worker.send(gen("long", "x", max_tokens=100000))
        worker.send(gen("queued", "y", max_tokens=100000))
        assert worker.read()["type"] == "token"
        killed = time.monotonic()
        os.kill(pids[1], signal.SIGKILL)
        ends: dict[object, Any] = {}
        while len(ends) < 2:
            line = worker.read(timeout=10)
            if line["type"] != "token":
                ends[line["id"]] = line
        elapsed = time.monotonic() - killed
        for line in ends.values():
            assert line["type"] == "error" and line["code"] == "rank_failed", line
            assert line["rank"] == 1 and line["exit_code"] == -9
            assert "rank 1" in line["error"] and "SIGKILL" in line["error"]
            assert isinstance(line["stderr_tail"], str)
        assert elapsed < 5.0
        assert worker.wait(10) == 1
        assert alive_after(pids, 2.0) == []
        assert "rank 1" in worker.stderr_text


def test_sigkill_of_rank_0_ends_rank_1(tiny_model: Path) -> None:
    with start_sharded(tiny_model) as worker:
        pids = rank_pids(worker)
        worker.send(gen("long", "x", max_tokens=100000))
        assert worker.read()["type"] == "token"
        worker.proc.kill()
        worker.wait(10)
        assert alive_after(pids, 2.0) == []


def test_a_rank_that_dies_while_idle_ends_the_worker(tiny_model: Path) -> None:
    with start_sharded(tiny_model) as worker:
        pids = rank_pids(worker)
        os.kill(pids[1], signal.SIGTERM)
        assert worker.wait(10) == 1
        assert alive_after(pids, 2.0) == []
        assert "rank 1" in worker.stderr_text and "SIGTERM" in worker.stderr_text


# -- pipeline ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.bridge.pipeline_model import build_pipeline_model

    return build_pipeline_model(tiny_model, tmp_path_factory.mktemp("models") / "qwen2")


def test_pipeline_equals_one_process(pipeline_model: Path) -> None:
    requests = [gen(f"p{i}", p) for i, p in enumerate(PROMPTS[:2])]
    chat = {"cmd": "chat", "id": "pc", "messages": CHAT, "max_tokens": 16}
    with WorkerProcess("bridge") as one:
        assert one.call({"cmd": "load", "id": "l", "path": str(pipeline_model)})["type"] == "loaded"
        want = [token_ids(one.request(r)) for r in [*requests, chat]]
    with WorkerProcess("bridge", args=[*SHARDED, "--shard", "pipeline"]) as worker:
        loaded = worker.call({"cmd": "load", "id": "l", "path": str(pipeline_model)}, timeout=120)
        assert loaded["type"] == "loaded", loaded
        assert loaded["sharding"]["mode"] == "pipeline"
        assert [token_ids(worker.request(r)) for r in [*requests, chat]] == want
        for r in requests:
            worker.send(r)
        together = worker.collect([r["id"] for r in requests])
        assert [token_ids(together[r["id"]]) for r in requests] == want[:2]


def test_pipeline_without_an_index_is_load_failed(tiny_model: Path) -> None:
    with WorkerProcess("bridge", args=[*SHARDED, "--shard", "pipeline"]) as worker:
        reply = worker.call({"cmd": "load", "id": "l", "path": str(tiny_model)}, timeout=120)
        assert reply["code"] == "load_failed" and "model.safetensors.index.json" in reply["error"]
        assert worker.call({"cmd": "ping", "id": "p"})["type"] == "pong"
