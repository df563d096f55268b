"""A host that forks: its child lets go of the worker's pipes, and leaves the worker alone.

The host is a subprocess running ``HOST``: it starts a worker (``mock_worker``),
forks, and then does what the test's mode says. ``sleep``: both sleep, and
the test SIGKILLs the host; the worker must see the end of its stdin and exit
although the forked child, which inherited the pipes, lives on. ``exit``: the
child's copy of the worker refuses requests, the child exits normally (its
``atexit`` finalizers run), and the host's worker must still answer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
import pytest

from tests.supervisor.conftest import ENV, ROOT

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork"),
]

HOST = textwrap.dedent(
    """
    import asyncio, json, os, sys, time
    from supervisor import AsyncWorker, Worker, WorkerClosed

    twin, mode = sys.argv[1:3]
    MOCK = [sys.executable, "-m", "mock_worker"]

    def report(**facts):
        sys.stdout.write(json.dumps(facts) + "\\n")
        sys.stdout.flush()

    def child_refuses(call):
        try:
            call()
        except WorkerClosed as exc:
            return "forked child" in str(exc)
        return False

    def sync_host():
        w = Worker(MOCK, model="m")
        pid = os.fork()
        if pid == 0:
            if mode == "sleep":
                time.sleep(120)
                os._exit(0)
            report(child_refused=child_refuses(w.ping))
            sys.exit(0)  # a normal exit: atexit and the Worker's finalizer run here
        report(worker=w.pid, child=pid)
        if mode == "sleep":
            time.sleep(120)
        os.waitpid(pid, 0)
        w.ping()
        report(host_worker_alive=w.returncode is None)
        w.close()

    async def async_host():
        w = await AsyncWorker(MOCK, model="m").start()
        pid = os.fork()
        if pid == 0:
            if mode == "sleep":
                time.sleep(120)
                os._exit(0)
            try:
                await w.ping()
                refused = False
            except WorkerClosed as exc:
                refused = "forked child" in str(exc)
            w._finalizer()  # what a forgotten AsyncWorker's finalizer does: nothing here
            report(child_refused=refused)
            os._exit(0)  # the event loop is the parent's: do not run it here
        report(worker=w.pid, child=pid)
        if mode == "sleep":
            time.sleep(120)
        os.waitpid(pid, 0)
        await w.ping()
        report(host_worker_alive=w.returncode is None)
        await w.aclose()

    if twin == "sync":
        sync_host()
    else:
        asyncio.run(async_host())
    """
)


@contextmanager
def host(twin: str, mode: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOST, twin, mode],
        stdout=subprocess.PIPE,
        env={**os.environ, **ENV},
        cwd=ROOT,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def read(proc: subprocess.Popen[bytes]) -> dict[str, object]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"the host ended early (status {proc.wait()})"
    facts = json.loads(line)
    assert isinstance(facts, dict)
    return facts


def gone(process: psutil.Process) -> bool:
    """Exited (a zombie counts: whoever adopted it reaps it)."""
    try:
        return bool(process.status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def kill(process: psutil.Process) -> None:
    try:
        process.kill()  # psutil checks the pid still names the same process
    except psutil.NoSuchProcess:
        pass


@pytest.mark.parametrize("twin", ["sync", "async"])
def test_a_killed_host_that_had_forked_leaves_no_worker_behind(twin: str) -> None:
    with host(twin, "sleep") as proc:
        facts = read(proc)
        worker = psutil.Process(int(str(facts["worker"])))
        child = psutil.Process(int(str(facts["child"])))
        try:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            deadline = time.monotonic() + 20.0
            while not gone(worker) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert gone(worker), "the worker outlived its host: the forked child holds its stdin"
            assert not gone(child), "the forked child should still be running"
        finally:
            kill(child)
            kill(worker)


@pytest.mark.parametrize("twin", ["sync", "async"])
def test_a_forked_child_refuses_requests_and_leaves_the_hosts_worker_alone(twin: str) -> None:
    with host(twin, "exit") as proc:
        facts = read(proc) | read(proc)  # the host's line and the child's, in either order
        worker = psutil.Process(int(str(facts["worker"])))
        try:
            assert facts["child_refused"] is True
            assert read(proc) == {"host_worker_alive": True}
            assert proc.wait(30) == 0
        finally:
            kill(worker)
