"""The fault matrix: every way a worker can fail a host, through ``Worker`` and ``AsyncWorker``.

One table states, for each fault of ``python -m mock_worker`` (and two that
only an inline worker can make), how it is provoked, which typed supervisor
error the host gets (or which clean outcome), and within how many seconds.
Each row runs through both twins; afterwards the worker process must be gone
and reaped (no zombie, no child of this process left), and where the row
says the worker survives, it must still answer.

The bounds are generous (a loaded 2-core machine) but finite: what matters
is that no fault hangs the host. The per-fault details (stderr tails, exit
codes in messages, restarts reloading the model, the close ladder's rungs)
are in tests/supervisor/test_faults.py, test_async.py and test_close.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
import pytest

from supervisor import (
    AsyncWorker,
    MemoryLimitExceeded,
    ProtocolError,
    RestartPolicy,
    SupervisorError,
    Worker,
    WorkerCrashed,
    WorkerTimeout,
)
from tests.harness import ROOT

pytestmark = pytest.mark.timeout(60)

MOCK = (sys.executable, "-m", "mock_worker")
OPTIONS: dict[str, Any] = {
    "env": {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
    "cwd": ROOT,
    "start_timeout": 15.0,
    "cancel_grace": 0.5,
    "quit_timeout": 1.0,
    "term_timeout": 1.0,
}
# Answers hello, then exits (status 0) at the first other request, without a reply.
EXIT_ON_REQUEST = textwrap.dedent(
    """
    import json, sys
    for line in sys.stdin:
        req = json.loads(line)
        if req["cmd"] != "hello":
            sys.exit(0)
        sys.stdout.write(json.dumps({"type": "hello", "id": req.get("id"), "ok": True,
            "protocol_version": 1, "versions": {}, "commands": [], "sampling_options": [],
            "limits": {}, "pid": 0, "model": None}) + "\\n")
        sys.stdout.flush()
    """
)
EXIT_BEFORE_HELLO = "import sys; sys.stderr.write('boom: bad configuration\\n'); sys.exit(3)"

CANCELLED = "cancelled"  # an outcome: the stream ended with finish_reason "cancelled"
NONE = "no error"  # an outcome: the stream ended normally


@dataclass(frozen=True)
class Fault:
    """One row: provoke ``fault`` by ``how``; expect one of ``outcomes`` within ``bound_s``."""

    name: str
    how: str  # start | stream | signal | cancel | call | storm
    outcomes: tuple[type[SupervisorError] | str, ...]
    bound_s: float
    flags: tuple[str, ...] = ()
    mock: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    send: int | None = None  # the signal, for how="signal"
    command: tuple[str, ...] | None = None  # instead of the mock
    survives: bool = False  # the same worker must answer afterwards
    check: Callable[[BaseException], bool] = lambda exc: True


MATRIX = (
    Fault(
        "crash mid-stream",
        "stream",
        (WorkerCrashed,),
        2.0,
        mock={"crash_after": 2, "exit_code": 7},
        check=lambda e: isinstance(e, WorkerCrashed) and e.exit_code == 7,
    ),
    Fault(
        "exit 0 before the first token",
        "stream",
        (WorkerCrashed,),
        2.0,
        mock={"crash_after": 0, "exit_code": 0},
        check=lambda e: isinstance(e, WorkerCrashed) and e.exit_code == 0,
    ),
    Fault(
        "exit without a reply",
        "call",
        (WorkerCrashed,),
        2.0,
        command=(sys.executable, "-c", EXIT_ON_REQUEST),
    ),
    Fault(
        "exit before hello",
        "start",
        (WorkerCrashed,),
        5.0,
        command=(sys.executable, "-c", EXIT_BEFORE_HELLO),
        check=lambda e: (
            isinstance(e, WorkerCrashed) and e.exit_code == 3 and "boom" in e.stderr_tail
        ),
    ),
    Fault(
        "hang mid-stream",
        "stream",
        (WorkerTimeout,),
        3.0,
        mock={"hang_after": 2},
        options={"request_timeout": 0.3},
    ),
    Fault(
        "hang in a load",
        "call",
        (WorkerTimeout,),
        3.0,
        flags=("--load-delay", "30"),
        options={"request_timeout": 0.3},
    ),
    Fault(
        "garbage line",
        "stream",
        (ProtocolError,),
        2.0,
        mock={"garbage_after": 1},
        survives=True,
        check=lambda e: isinstance(e, ProtocolError) and e.line == b"this is not json",
    ),
    Fault(
        "stderr flood mid-stream (10 MiB)",
        "stream",
        (NONE,),
        10.0,
        mock={"stderr_flood": 10 << 20},
        survives=True,
    ),
    Fault(
        "stderr flood before hello (10 MiB)",
        "start",
        (NONE,),
        10.0,
        flags=("--stderr-flood", "10M"),
        survives=True,
    ),
    Fault(
        "slow hello",
        "start",
        (WorkerTimeout,),
        3.0,
        flags=("--hello-delay", "30"),
        options={"start_timeout": 0.5},
    ),
    Fault(
        "SIGKILL mid-stream",
        "signal",
        (WorkerCrashed,),
        1.0,
        send=signal.SIGKILL,
        check=lambda e: isinstance(e, WorkerCrashed) and e.signal == signal.SIGKILL,
    ),
    Fault(
        "SIGSEGV mid-stream",
        "signal",
        (WorkerCrashed,),
        1.0,
        send=signal.SIGSEGV,
        check=lambda e: isinstance(e, WorkerCrashed) and e.signal == signal.SIGSEGV,
    ),
    # The worker treats SIGTERM like quit: the stream ends cancelled, then the worker is gone.
    Fault("SIGTERM mid-stream", "signal", (CANCELLED,), 2.0, send=signal.SIGTERM),
    Fault("ignored cancel", "cancel", (WorkerTimeout,), 2.5, mock={"ignore_cancel": True}),
    Fault(
        "restart storm",
        "storm",
        (WorkerCrashed,),
        20.0,
        mock={"crash_after": 0},
        options={"restart": RestartPolicy(max_restarts=2, window_s=60)},
        check=lambda e: "gave up restarting" in str(e),
    ),
    Fault(
        "memory over the limit",
        "stream",
        (MemoryLimitExceeded,),
        3.0,
        options={"memory_limit_bytes": 1, "memory_poll_interval": 0.05},
    ),
)


@dataclass
class Seen:
    """What a row did: the outcome, how long it took, every worker pid it saw."""

    outcome: BaseException | str | None = None
    took: float = 0.0
    pids: set[int] = field(default_factory=set)
    survived: bool | None = None


def _command(fault: Fault) -> list[str]:
    return list(fault.command or (*MOCK, "--token-delay", "0.01", *fault.flags))


def _model(fault: Fault) -> str | None:
    return None if fault.command else "mock-model"


def run_sync(fault: Fault) -> Seen:
    seen = Seen()
    started = time.perf_counter()
    w: Worker | None = None
    try:
        w = Worker(_command(fault), model=_model(fault), **(OPTIONS | fault.options))
        seen.pids.add(w.pid)
        extra = {"mock": fault.mock} if fault.mock else None
        if fault.how == "start":
            seen.outcome = NONE
        elif fault.how == "call":
            started = time.perf_counter()
            w.load("slow") if fault.flags else w.ping()
            seen.outcome = NONE
        elif fault.how == "storm":
            started = time.perf_counter()
            for _ in range(10):
                try:
                    w.generate("a", max_tokens=5, extra=extra).text()
                except WorkerCrashed:
                    pass
                w.ping()  # waits for the restart; raises once the guard gives up
                seen.pids.add(w.pid)
            seen.outcome = NONE
        else:
            stream = w.generate(
                "a b", max_tokens=100_000 if fault.how != "stream" else 100, extra=extra
            )
            if fault.how in ("signal", "cancel"):
                next(stream)
                started = time.perf_counter()
                if fault.how == "signal":
                    assert fault.send is not None
                    os.kill(w.pid, fault.send)
                else:
                    stream.cancel()
            else:
                started = time.perf_counter()
            for _ in stream:
                pass
            seen.outcome = (
                stream.result.finish_reason if stream.result.finish_reason == CANCELLED else NONE
            )
    except SupervisorError as exc:
        seen.outcome = exc
    seen.took = time.perf_counter() - started
    if w is not None:
        seen.pids.add(w.pid)
        if fault.survives:
            try:
                w.ping(timeout=5)
                seen.survived = True
            except SupervisorError:
                seen.survived = False
        elif fault.how == "signal" and seen.outcome == CANCELLED:
            with pytest.raises(WorkerCrashed):
                w.ping(timeout=5)
        w.close()
    return seen


def run_async(fault: Fault) -> Seen:
    async def main() -> Seen:
        seen = Seen()
        started = time.perf_counter()
        w = AsyncWorker(_command(fault), model=_model(fault), **(OPTIONS | fault.options))
        try:
            await w.start()
            seen.pids.add(w.pid)
            extra = {"mock": fault.mock} if fault.mock else None
            if fault.how == "start":
                seen.outcome = NONE
            elif fault.how == "call":
                started = time.perf_counter()
                await (w.load("slow") if fault.flags else w.ping())
                seen.outcome = NONE
            elif fault.how == "storm":
                started = time.perf_counter()
                for _ in range(10):
                    try:
                        await w.generate("a", max_tokens=5, extra=extra).text()
                    except WorkerCrashed:
                        pass
                    await w.ping()
                    seen.pids.add(w.pid)
                seen.outcome = NONE
            else:
                stream = w.generate(
                    "a b", max_tokens=100_000 if fault.how != "stream" else 100, extra=extra
                )
                if fault.how in ("signal", "cancel"):
                    await stream.__anext__()
                    started = time.perf_counter()
                    if fault.how == "signal":
                        assert fault.send is not None
                        os.kill(w.pid, fault.send)
                    else:
                        await stream.cancel()
                else:
                    started = time.perf_counter()
                async for _ in stream:
                    pass
                reason = stream.result.finish_reason
                seen.outcome = reason if reason == CANCELLED else NONE
        except SupervisorError as exc:
            seen.outcome = exc
        seen.took = time.perf_counter() - started
        try:
            seen.pids.add(w.pid)
        except RuntimeError:
            pass  # it never started
        if fault.survives and seen.pids:
            try:
                await w.ping(timeout=5)
                seen.survived = True
            except SupervisorError:
                seen.survived = False
        elif fault.how == "signal" and seen.outcome == CANCELLED:
            with pytest.raises(WorkerCrashed):
                await w.ping(timeout=5)
        await w.aclose()
        return seen

    return asyncio.run(asyncio.wait_for(main(), 50))


def _gone(pid: int) -> bool:
    """Exited and reaped (a zombie still exists)."""
    return not psutil.pid_exists(pid)


@pytest.mark.parametrize("twin", ["Worker", "AsyncWorker"])
@pytest.mark.parametrize("fault", MATRIX, ids=[f.name for f in MATRIX])
def test_fault(fault: Fault, twin: str) -> None:
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    seen = (run_sync if twin == "Worker" else run_async)(fault)
    outcome = seen.outcome
    kinds = [o for o in fault.outcomes if not isinstance(o, str)]
    names = [o for o in fault.outcomes if isinstance(o, str)]
    matched = (isinstance(outcome, BaseException) and isinstance(outcome, tuple(kinds))) or (
        isinstance(outcome, str) and outcome in names
    )
    assert matched, f"{fault.name}: expected {fault.outcomes}, got {outcome!r}"
    if isinstance(outcome, BaseException):
        assert fault.check(outcome), f"{fault.name}: {outcome!r}"
    assert seen.took < fault.bound_s, (
        f"{fault.name}: took {seen.took:.2f} s, the bound is {fault.bound_s} s"
    )
    if fault.survives:
        assert seen.survived, f"{fault.name}: the worker did not survive"
    # After close: every worker this row started is gone and reaped, and nothing else was left.
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        left = [p for p in me.children(recursive=True) if p.pid not in before]
        if not left and all(_gone(pid) for pid in seen.pids):
            break
        time.sleep(0.02)
    assert all(_gone(pid) for pid in seen.pids), (
        f"{fault.name}: a worker process is left: {seen.pids}"
    )
    left = [p for p in me.children(recursive=True) if p.pid not in before]
    assert not left, f"{fault.name}: processes left (zombies included): {left}"
