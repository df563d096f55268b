"""The conformance kit, run as users run it: ``python -m protocol.conformance -- WORKER``.

Both workers of this project pass it; workers that break one rule each
(built from mock_worker's faults, or a small proxy that rewrites its output)
fail the case that checks that rule; a worker that never answers fails within
the timeouts instead of hanging the kit.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from protocol.conformance.cases import GROUPS
from protocol.conformance.checker import DEFAULT_SCHEMA, ReplyChecker, load_checker
from protocol.conformance.cli import select
from protocol.conformance.matching import same_json
from tests.harness import ROOT, worker_env
from tests.schema_check import validate_reply, validate_request

PY = sys.executable

WRONG_HELLO = """
import json, sys
for raw in sys.stdin.buffer:
    try:
        request = json.loads(raw)
    except ValueError:
        continue
    reply = {"type": "hello", "ok": True}  # no protocol_version, commands, limits, ...
    if isinstance(request, dict) and "id" in request:
        reply["id"] = request["id"]
    sys.stdout.write(json.dumps(reply) + "\\n")
    sys.stdout.flush()
"""

SILENT = """
import sys
for _ in sys.stdin.buffer:
    pass  # reads every request, answers none
"""

PROXY = """
import json, subprocess, sys, threading

mode = sys.argv[1]
# claims-batching: the mock runs one request at a time, but hello says 8
serial = ["--max-concurrency", "1"] if mode == "claims-batching" else []
child = subprocess.Popen(
    [sys.executable, "-m", "mock_worker", *serial], stdin=subprocess.PIPE, stdout=subprocess.PIPE
)
lock = threading.Lock()

def emit(raw):
    with lock:
        sys.stdout.buffer.write(raw)
        sys.stdout.buffer.flush()

def pump():
    for raw in child.stdout:
        line = json.loads(raw)
        if mode == "string-ids" and isinstance(line.get("id"), int):
            line["id"] = str(line["id"])
        if mode == "extra-field" and line["type"] == "pong":
            line["extra"] = 1
        if mode == "claims-batching" and line["type"] == "hello":
            line["limits"]["max_concurrency"] = 8
        if mode == "unasked-progress" and line["type"] == "done" and "id" in line:
            stray = {"type": "progress", "id": line["id"], "stage": "prefill", "done": 1}
            emit((json.dumps(stray) + "\\n").encode())
        emit((json.dumps(line, ensure_ascii=False) + "\\n").encode())

thread = threading.Thread(target=pump)
thread.start()
for raw in sys.stdin.buffer:
    child.stdin.write(raw)
    child.stdin.flush()
    if mode == "answer-cancel" and b'"cancel"' in raw:
        emit(b'{"type":"error","error":"nothing to cancel","code":"invalid_request"}\\n')
child.stdin.close()
thread.join()
sys.exit(child.wait())
"""


def kit(*args: str, worker: Sequence[str], timeout: float = 110.0) -> tuple[int, str, float]:
    """Run the kit; return its exit status, its stdout and stderr, and the seconds it took."""
    start = time.monotonic()
    done = subprocess.run(
        [PY, "-m", "protocol.conformance", *args, "--", *worker],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=worker_env(),
    )
    return done.returncode, done.stdout + done.stderr, time.monotonic() - start


def script(tmp_path: Path, name: str, source: str) -> list[str]:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source), encoding="utf-8")
    return [PY, str(path)]


def case_count() -> int:
    return sum(len(group.cases) for group in GROUPS)


@pytest.mark.parametrize("module", ["bridge", "mock_worker"])
def test_both_workers_pass_every_case(module: str, tiny_model: Path) -> None:
    status, output, _ = kit("--model", str(tiny_model), worker=[PY, "-m", module])
    assert status == 0, output
    assert f"{case_count()} passed, 0 failed, 0 skipped" in output, output
    assert "  FAIL " not in output


def test_the_sharded_worker_passes_every_case_but_inspect(tiny_model: Path) -> None:
    """Two ranks over the ring backend; hello leaves out inspect, which it refuses."""
    worker = [PY, "-m", "bridge", "--ranks", "2", "--backend", "ring"]
    status, output, _ = kit("--model", str(tiny_model), worker=worker, timeout=240)
    assert status == 0, output
    assert f"{case_count() - 1} passed, 0 failed, 1 skipped" in output, output
    assert "hello's commands leave out inspect" in output


def test_the_fixture_model_is_built_when_no_model_is_given() -> None:
    status, output, _ = kit("--only", "model / load", worker=[PY, "-m", "mock_worker"])
    assert status == 0, output
    assert "built with python -m bridge.demo_model" in output
    assert "1 passed, 0 failed" in output


def test_a_worker_with_a_wrong_hello_fails_every_case(tmp_path: Path) -> None:
    worker = script(tmp_path, "wrong_hello.py", WRONG_HELLO)
    status, output, seconds = kit("--model", "unused", "--timeout", "5", worker=worker)
    assert status == 1, output
    assert f"0 passed, {case_count()} failed" in output, output
    assert "setup: invalid reply line: schema #/$defs/reply_hello" in output
    assert "'protocol_version' is a required property" in output
    assert seconds < 60


def test_a_silent_worker_fails_in_bounded_time(tmp_path: Path) -> None:
    worker = script(tmp_path, "silent.py", SILENT)
    status, output, seconds = kit(
        "--timeout", "1", "--only", "startup", "--only", "input", worker=worker
    )
    assert status == 1, output
    assert "timed out waiting for the terminal line of 'hello' id 'kit-hello'" in output
    assert "not run: this group's setup failed" in output
    assert seconds < 20


@pytest.mark.parametrize(
    ("worker_args", "only", "evidence"),
    [
        (
            ["--quit-silently"],
            "cancel / quit",
            "output ended (exit status 0), waiting for the terminal line of 'quit' id 'q'",
        ),
        (["--garbage-after", "1"], "model / generate", "stdout carried a line that is not JSON"),
        (
            ["--ignore-cancel"],
            "cancel / cancel while decoding",
            "timed out waiting for the terminal line",
        ),
        (
            ["--crash-after", "2", "--exit-code", "3"],
            "model / generate",
            "the worker's output ended (exit status 3)",
        ),
    ],
    ids=["no-bye", "garbage", "ignores-cancel", "crash"],
)
def test_faulty_mock_workers_fail_the_case_that_checks_the_rule(
    worker_args: list[str], only: str, evidence: str
) -> None:
    status, output, _ = kit(
        "--model",
        "m",
        "--timeout",
        "3",
        "--only",
        only,
        worker=[PY, "-m", "mock_worker", *worker_args],
    )
    assert status == 1, output
    assert evidence in output, output


@pytest.mark.parametrize(
    ("mode", "only", "evidence"),
    [
        ("string-ids", "startup / ping", "the JSON type changed"),
        (
            "extra-field",
            "startup / ping",
            "Additional properties are not allowed ('extra' was unexpected)",
        ),
        ("answer-cancel", "startup / cancel", "id-less line(s) nobody asked for"),
        ("claims-batching", "batching / several", "did not interleave"),
        ("unasked-progress", "batching / progress", "which did not ask for progress"),
    ],
)
def test_a_proxy_that_breaks_one_rule_is_caught(
    tmp_path: Path, mode: str, only: str, evidence: str
) -> None:
    worker = [*script(tmp_path, "proxy.py", PROXY), mode]
    status, output, _ = kit("--timeout", "5", "--only", only, worker=worker)
    assert status == 1, output
    assert evidence in output, output
    assert "--- last" in output and "-> " in output and "<- " in output  # the transcript


def test_command_line() -> None:
    listed = subprocess.run(
        [PY, "-m", "protocol.conformance", "--list"], capture_output=True, text=True, cwd=ROOT
    )
    assert listed.returncode == 0
    for group in GROUPS:
        assert f"{group.name}: {group.about}" in listed.stdout
    no_worker = subprocess.run(
        [PY, "-m", "protocol.conformance"], capture_output=True, text=True, cwd=ROOT
    )
    assert no_worker.returncode == 2 and "give the worker command after --" in no_worker.stderr
    bad_schema = subprocess.run(
        [PY, "-m", "protocol.conformance", "--schema", "/no/such.json", "--", "true"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert bad_schema.returncode == 2 and "no such file" in bad_schema.stderr


def test_only_keeps_the_chosen_groups_as_they_are_but_for_their_cases() -> None:
    """``--only`` runs a case the way a full run does: same model, same worker sharing."""
    chosen = select(GROUPS, ["INPUT / framing", "go-mlx / info"])
    originals = {group.name: group for group in GROUPS}
    assert [group.name for group in chosen] == ["input", "go-mlx"]
    for group in chosen:
        original = originals[group.name]
        assert (group.about, group.model, group.same_worker) == (
            original.about,
            original.model,
            original.same_worker,
        )
        assert len(group.cases) == 1 and group.cases[0] in original.cases
    assert select(GROUPS, []) == list(GROUPS)


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        (1, 1, True),
        (1, 1.0, False),
        (1, True, False),
        (0, None, False),
        (True, True, True),
        ("1", 1, False),
        ("x", "x", True),
        (None, None, True),
        ([1, [2]], [1, [2]], True),
        ([1], [1.0], False),
        ({"a": 1}, {"a": 1}, True),
        ({"a": 1}, {"a": True}, False),
        ({"a": 1}, {"a": 1, "b": 2}, False),
    ],
)
def test_patterns_compare_as_json(a: object, b: object, same: bool) -> None:
    assert same_json(a, b) is same and same_json(b, a) is same


def test_case_names_are_unique_within_a_group() -> None:
    for group in GROUPS:
        names = [case.name for case in group.cases]
        assert len(names) == len(set(names)), group.name
        assert all(not case.ends_worker for case in group.cases[:-1]), group.name


def test_the_checker_uses_the_schema_and_falls_back_to_the_decoder() -> None:
    assert load_checker(None).schema is not None  # this checkout has docs/
    assert DEFAULT_SCHEMA == ROOT / "docs" / "protocol.schema.json"
    with_schema = load_checker(DEFAULT_SCHEMA)
    pong = {"type": "pong", "id": 1, "ok": True}
    assert with_schema.problem(pong) is None
    extra = with_schema.problem({**pong, "extra": 1})
    assert extra is not None and extra.startswith("schema #/$defs/reply_pong")
    decoder_only = ReplyChecker(None, description="decoder only")
    assert decoder_only.problem({**pong, "extra": 1}) is None  # the decoder ignores extras
    missing = decoder_only.problem({"type": "done", "done": True})
    assert missing is not None and missing.startswith("decoder: done.finish_reason: required")


def test_the_json_examples_in_the_hosts_guide_are_valid() -> None:
    text = (ROOT / "docs" / "hosts.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```json\n(.*?)```", text, re.S)
    assert blocks
    for block in blocks:
        for line in block.splitlines():
            obj = json.loads(line)
            if "cmd" in obj:
                validate_request(obj)
            else:
                validate_reply(obj)
