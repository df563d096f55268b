"""Every fault, set by a flag and by a request's ``mock`` object, seen from outside."""

from __future__ import annotations

import signal
import time

import pytest

from protocol.errors import ERROR_CODES
from tests.mock_worker.harness import MockWorker, decode, text_of

pytestmark = pytest.mark.timeout(20)

LONG = {"cmd": "generate", "id": "g", "prompt": "a b c", "max_tokens": 10000}


def test_token_delay_flag_paces_tokens() -> None:
    with MockWorker("--token-delay", "0.05") as worker:
        worker.load()
        start = time.perf_counter()
        lines = worker.request({"cmd": "generate", "id": 1, "prompt": "x", "max_tokens": 5})
        assert len(lines) == 6 and time.perf_counter() - start >= 0.25


def test_token_delay_per_request_wins_over_the_flag() -> None:
    with MockWorker("--token-delay", "5") as worker:
        worker.load()
        start = time.perf_counter()
        request = {"cmd": "chat", "id": 1, "messages": [{"role": "user", "content": "x"}]}
        lines = worker.request({**request, "max_tokens": 20, "mock": {"token_delay": 0}})
        assert len(lines) == 21 and time.perf_counter() - start < 2


def test_eos_after_flag_ends_every_generation_with_stop() -> None:
    with MockWorker("--eos-after", "2") as worker:
        worker.load()
        lines = worker.request(LONG)
        assert text_of(lines) == "a b" and lines[-1]["finish_reason"] == "stop"
        lines = worker.request({**LONG, "id": 2, "mock": {"eos_after": 4}})
        assert text_of(lines) == "a b c a" and lines[-1]["finish_reason"] == "stop"
        lines = worker.request({**LONG, "id": 3, "max_tokens": 5, "mock": {"eos_after": None}})
        assert text_of(lines) == "a b c a b" and lines[-1]["finish_reason"] == "length"


def test_hello_delay_makes_hello_slow() -> None:
    with MockWorker("--hello-delay", "0.6") as worker:
        worker.send({"cmd": "hello", "id": 1})
        assert worker.read()["type"] == "hello"
        assert time.perf_counter() - worker.started >= 0.6


@pytest.mark.parametrize("per_request", [False, True])
def test_crash_after_exits_with_the_code_and_no_terminal_line(per_request: bool) -> None:
    faults = {"crash_after": 3, "exit_code": 7}
    flags = [] if per_request else ["--crash-after", "3", "--exit-code", "7"]
    with MockWorker(*flags) as worker:
        worker.load()
        worker.send({**LONG, "mock": faults} if per_request else LONG)
        lines = [decode(raw) for raw in worker.rest()]
        assert [line["type"] for line in lines] == ["token"] * 3
        assert worker.wait() == 7
        assert "crash_after=3" in worker.stderr


def test_null_turns_a_flag_fault_off_for_one_request() -> None:
    with MockWorker("--crash-after", "1", "--token-delay", "5") as worker:
        worker.load()
        lines = worker.request(
            {**LONG, "max_tokens": 3, "mock": {"crash_after": None, "token_delay": None}}
        )
        assert text_of(lines) == "a b c" and worker.alive()


def test_crash_before_any_token() -> None:
    with MockWorker() as worker:
        worker.load()
        worker.send({**LONG, "mock": {"crash_after": 0, "exit_code": 42}})
        assert worker.rest() == [] and worker.wait() == 42


@pytest.mark.parametrize("per_request", [False, True])
def test_hang_after_silences_the_request_but_not_the_worker(per_request: bool) -> None:
    flags = [] if per_request else ["--hang-after", "2"]
    with MockWorker(*flags) as worker:
        worker.load()
        worker.send({**LONG, "mock": {"hang_after": 2}} if per_request else LONG)
        assert [worker.read()["type"] for _ in range(2)] == ["token", "token"]
        assert worker.quiet_for(0.2)
        assert worker.call({"cmd": "ping", "id": "p"})["type"] == "pong"
        assert worker.call({"cmd": "hello", "id": "h"})["type"] == "hello"
        assert worker.call({"cmd": "info", "id": "i"})["type"] == "info"
        worker.send({"cmd": "cancel", "id": "g"})
        assert worker.quiet_for(0.2)  # the cancel is never answered
        worker.send({"cmd": "tokenize", "id": "t", "text": "x"})
        assert worker.quiet_for(0.2)  # queued behind the hung request
        assert worker.alive()


def test_a_hung_worker_still_exits_on_quit() -> None:
    with MockWorker("--hang-after", "0") as worker:
        worker.load()
        worker.send(LONG)
        assert worker.quiet_for(0.2)
        worker.send({"cmd": "quit", "id": "q"})
        assert worker.wait() == 0
        lines = [decode(raw) for raw in worker.rest()]
        assert [(line["id"], line["type"]) for line in lines] == [("g", "error"), ("q", "bye")]
        assert lines[0]["code"] == "shutting_down"


@pytest.mark.parametrize("per_request", [False, True])
def test_garbage_after_writes_one_non_json_line_then_goes_on(per_request: bool) -> None:
    flags = [] if per_request else ["--garbage-after", "2"]
    with MockWorker(*flags) as worker:
        worker.load()
        request = {"cmd": "generate", "id": "g", "prompt": "a b c", "max_tokens": 4}
        worker.send({**request, "mock": {"garbage_after": 2}} if per_request else request)
        raw = [worker.read_raw() for _ in range(6)]
        assert raw[2] == b"this is not json\n"
        lines = [decode(r) for r in raw[:2] + raw[3:] if r is not None]
        assert text_of(lines) == "a b c a" and lines[-1]["finish_reason"] == "length"
        assert worker.call({"cmd": "ping", "id": 1})["type"] == "pong"


def test_stderr_flood_flag_floods_at_start_up() -> None:
    size = 10 * 1024 * 1024
    with MockWorker("--stderr-flood", "10M") as worker:
        assert worker.call({"cmd": "hello", "id": 1}, timeout=10)["type"] == "hello"
        worker.send({"cmd": "quit"})
        assert worker.wait() == 0
        worker.close()
        assert worker.stderr_bytes >= size
        assert "stderr flood line" in worker.stderr


def test_stderr_flood_per_request_floods_before_generating() -> None:
    with MockWorker() as worker:
        worker.load()
        before = worker.stderr_bytes
        lines = worker.request({**LONG, "max_tokens": 2, "mock": {"stderr_flood": 200_000}})
        assert lines[-1]["finish_reason"] == "length"
        deadline = time.monotonic() + 5
        while worker.stderr_bytes - before < 200_000 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert worker.stderr_bytes - before >= 200_000


@pytest.mark.parametrize("code", ["out_of_memory", "load_failed", "model_not_found"])
def test_fail_load_flag(code: str) -> None:
    with MockWorker("--fail-load", code) as worker:
        for rid in ("l", None):
            request = {"cmd": "load", "path": "p"} | ({} if rid is None else {"id": rid})
            reply = worker.call(request)
            assert reply["type"] == "error" and reply["code"] == code and reply.get("id") == rid
            assert reply["error"].startswith("p: ")
        assert worker.call({"cmd": "info", "id": "i"})["code"] == "no_model"


def test_fail_load_per_request_takes_any_error_code() -> None:
    with MockWorker() as worker:
        for code in ERROR_CODES:
            reply = worker.call(
                {"cmd": "load", "id": code, "path": "p", "mock": {"fail_load": code}}
            )
            assert reply["code"] == code
        assert worker.load()["model_type"] == "mock"


def test_a_failed_load_keeps_no_model() -> None:
    with MockWorker() as worker:
        worker.load("first")
        reply = worker.call(
            {"cmd": "load", "id": 1, "path": "p", "mock": {"fail_load": "out_of_memory"}}
        )
        assert reply["code"] == "out_of_memory"
        assert worker.call({"cmd": "info", "id": 2})["path"] == "first"


def test_load_delay() -> None:
    with MockWorker("--load-delay", "0.3") as worker:
        start = time.perf_counter()
        worker.load()
        assert time.perf_counter() - start >= 0.3
        assert (
            worker.call({"cmd": "load", "id": 1, "path": "p", "mock": {"load_delay": 0}})["type"]
            == "loaded"
        )


@pytest.mark.parametrize(
    ("per_request", "cancel"),
    [(False, {"cmd": "cancel", "id": "g"}), (True, {"cmd": "cancel"})],
    ids=["flag-cancel-by-id", "per-request-cancel-all"],
)
def test_ignore_cancel_never_finishes_the_generation(
    per_request: bool, cancel: dict[str, object]
) -> None:
    flags = [] if per_request else ["--ignore-cancel"]
    with MockWorker(*flags) as worker:
        worker.load()
        faults = {"token_delay": 0.01} | ({"ignore_cancel": True} if per_request else {})
        worker.send({**LONG, "mock": faults})
        assert worker.read()["type"] == "token"
        worker.send(cancel)
        in_flight = [decode(raw) for raw in worker.lines_within(0.2)]
        assert all(line["type"] == "token" for line in in_flight), in_flight
        assert worker.quiet_for(0.2)
        assert worker.call({"cmd": "ping", "id": "p"})["type"] == "pong"
        assert worker.alive()  # a host must time out and kill it


def test_without_ignore_cancel_the_same_request_cancels() -> None:
    with MockWorker() as worker:
        worker.load()
        worker.send({**LONG, "mock": {"token_delay": 0.01}})
        worker.read()
        worker.send({"cmd": "cancel", "id": "g"})
        assert worker.read_until_terminal("g")[-1]["finish_reason"] == "cancelled"


@pytest.mark.parametrize("rid", ["q", None])
def test_quit_silently_exits_0_without_a_line(rid: str | None) -> None:
    with MockWorker("--quit-silently") as worker:
        worker.load()
        worker.send({**LONG, "mock": {"token_delay": 0.01}})
        assert worker.read()["type"] == "token"
        worker.send({"cmd": "quit"} | ({} if rid is None else {"id": rid}))
        assert worker.wait() == 0
        rest = [decode(raw) for raw in worker.rest()]
        assert all(line["type"] == "token" for line in rest), rest


def test_quit_silently_on_end_of_stdin() -> None:
    with MockWorker("--quit-silently") as worker:
        worker.load()
        worker.send({**LONG, "mock": {"token_delay": 0.01}})
        worker.read()
        worker.close_stdin()
        assert worker.wait() == 0
        assert all(decode(raw)["type"] == "token" for raw in worker.rest())


def test_ignore_quit_needs_sigterm() -> None:
    with MockWorker("--ignore-quit") as worker:
        worker.send({"cmd": "quit", "id": "q"})
        worker.close_stdin()
        assert worker.quiet_for(0.4) and worker.alive()
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.wait() == -signal.SIGTERM


def test_ignore_sigterm_needs_sigkill() -> None:
    with MockWorker("--ignore-quit", "--ignore-sigterm") as worker:
        assert worker.call({"cmd": "hello", "id": 1})["type"] == "hello"
        worker.close_stdin()
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.quiet_for(0.4) and worker.alive()
        worker.proc.kill()
        assert worker.wait() == -signal.SIGKILL


def test_the_flags_are_validated() -> None:
    for flags in (["--fail-load", "oops"], ["--exit-code", "300"], ["--token-delay", "-1"]):
        with MockWorker(*flags) as worker:
            assert worker.wait() == 2
            assert "error" in worker.stderr
