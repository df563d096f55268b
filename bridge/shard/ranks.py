"""Rank 0's hold on the other ranks: start them, tell them, hear them, end them.

Each rank r ≥ 1 is a child process of rank 0 (through ``ssh`` for a rank on
another host), with three pipes: its stdin carries rank 0's orders
(:mod:`bridge.shard.control`), its stdout its answers, and its stderr is
copied line by line to rank 0's stderr, prefixed ``rank r:``, keeping the
last lines for the error a death is reported with.

**No rank outlives rank 0.** A rank exits as soon as its stdin reaches end
of file, which happens however rank 0 ends (even by SIGKILL: the kernel
closes the pipe); it also asks Linux to kill it if rank 0 dies
(``PR_SET_PDEATHSIG``, :mod:`bridge.shard.follower`). :meth:`RankGroup.close`
stops the ranks (a ``Stop`` order, then SIGKILL after a grace period).

**No rank hangs rank 0.** A thread waits on each rank's process; a rank
that ends while the group is not closing is a failure: the other ranks are
killed and ``on_lost`` hears a :class:`~protocol.errors.RankFailed`
(rank 0 then ends every request with it and exits, since a collective with
a dead peer never completes).
"""

from __future__ import annotations

import logging
import os
import queue
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from bridge.shard import control
from bridge.shard.plan import ShardPlan, rank_environment, ring_addresses, write_ring_hostfile
from protocol.errors import RankFailed
from protocol.launch import module_command

log = logging.getLogger("bridge.shard")

FOLLOWER_MODULE = "bridge.shard.follower"
STOP_GRACE_S = 1.0
TAIL_LINES = 40
# How long a rank that just failed a collective may take to be seen dead.
DEATH_WAIT_S = 1.5

LostHook = Callable[[RankFailed], None]


class _Rank:
    def __init__(self, rank: int, process: subprocess.Popen[bytes]) -> None:
        self.rank = rank
        self.process = process
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.answers: queue.Queue[Any] = queue.Queue()
        self.write_lock = threading.Lock()

    def stderr_tail(self) -> str:
        return "".join(self.tail)


class RankGroup:
    """Ranks 1..N-1 of a sharded worker, owned by rank 0 (a context manager)."""

    def __init__(self, plan: ShardPlan, engine_options: dict[str, Any]) -> None:
        self.plan = plan
        self._engine_options = engine_options
        self._ranks: list[_Rank] = []
        self._closing = False
        self._lost: RankFailed | None = None
        self._lost_event = threading.Event()
        self._on_lost: LostHook | None = None
        self._hooks_lock = threading.Lock()
        self._dir = tempfile.TemporaryDirectory(prefix="mlx-bridge-ranks-")
        self.hostfile = write_ring_hostfile(plan, Path(self._dir.name))

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> RankGroup:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def own_environment(self) -> dict[str, str]:
        """What rank 0 sets in its own environment before MLX starts."""
        return rank_environment(self.plan, 0, self.hostfile)

    def start(self) -> None:
        """Start ranks 1..N-1 (they connect to rank 0 when it initialises MLX's group)."""
        for rank in range(1, self.plan.ranks):
            process = self._spawn(rank)
            r = _Rank(rank, process)
            self._ranks.append(r)
            threading.Thread(
                target=self._pump_stderr, args=(r,), name=f"rank{rank}-stderr", daemon=True
            ).start()
            threading.Thread(
                target=self._read_answers, args=(r,), name=f"rank{rank}-answers", daemon=True
            ).start()
            threading.Thread(
                target=self._watch, args=(r,), name=f"rank{rank}-watch", daemon=True
            ).start()
            start = control.Start(
                rank=rank,
                engine_options=self._engine_options,
                mode=self.plan.mode,
                backend=self.plan.backend,
            )
            self._send_to(r, [start])

    def close(self) -> None:
        """Stop every rank; SIGKILL what is still alive after the grace period."""
        self._closing = True
        for r in self._ranks:
            self._send_to(r, [control.Stop()])
            _close_quietly(r.process.stdin)
        deadline = time.monotonic() + STOP_GRACE_S
        for r in self._ranks:
            try:
                r.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("rank %d did not stop within %.1fs; killing it", r.rank, STOP_GRACE_S)
        self.kill()
        self._dir.cleanup()

    def kill(self) -> None:
        for r in self._ranks:
            if r.process.poll() is None:
                try:
                    r.process.kill()
                except OSError:
                    pass
        for r in self._ranks:
            try:
                r.process.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                log.error("rank %d (pid %d) survived SIGKILL", r.rank, r.process.pid)

    # -- failure -----------------------------------------------------------------------

    def on_lost(self, hook: LostHook) -> None:
        """``hook`` hears the first rank that dies (at once, if one already has)."""
        with self._hooks_lock:
            self._on_lost = hook
            lost = self._lost
        if lost is not None:
            hook(lost)

    def lost(self, wait: float = 0.0) -> RankFailed | None:
        """The failure, if a rank has died (waiting up to ``wait`` seconds for one)."""
        if wait > 0:
            self._lost_event.wait(wait)
        return self._lost

    def failed(self, error: BaseException) -> RankFailed:
        """What a failed collective or engine call on rank 0 means: a rank that
        died (seen within ``DEATH_WAIT_S``), or rank 0's own failure."""
        lost = self.lost(DEATH_WAIT_S)
        if lost is not None:
            return lost
        return RankFailed(
            f"rank 0 (pid {os.getpid()}) failed: {type(error).__name__}: {error}",
            rank=0,
            exit_code=None,
        )

    def _watch(self, r: _Rank) -> None:
        code = r.process.wait()
        if self._closing:
            return
        error = RankFailed(
            f"rank {r.rank} (pid {r.process.pid}) died: {_describe_exit(code)}",
            rank=r.rank,
            exit_code=code,
            stderr_tail="",
        )
        time.sleep(0.05)  # let its last stderr lines arrive
        error.stderr_tail = r.stderr_tail()
        with self._hooks_lock:
            if self._lost is not None:
                return
            self._lost = error
            hook = self._on_lost
        log.error("%s; stopping every rank", error.message)
        self._lost_event.set()
        self._closing = True
        self.kill()
        if hook is not None:
            hook(error)

    # -- orders and answers -----------------------------------------------------------

    def send(self, messages: Sequence[control.Order]) -> None:
        """One frame to every rank. A rank that cannot be written to has died:
        its watcher reports it."""
        frame = control.encode(messages)
        for r in self._ranks:
            self._write(r, frame)

    def answers(self, kind: type[Any], timeout: float | None = None) -> list[Any]:
        """One answer of ``kind`` from every rank, in rank order. Raises
        :class:`~protocol.errors.RankFailed` if a rank dies first, TimeoutError
        after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        out = []
        for r in self._ranks:
            while True:
                if self._lost is not None:
                    raise self._lost
                wait = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
                if wait <= 0:
                    raise TimeoutError(f"rank {r.rank} did not answer within {timeout}s")
                try:
                    answer = r.answers.get(timeout=wait)
                except queue.Empty:
                    continue
                if isinstance(answer, kind):
                    out.append(answer)
                    break
                log.debug("rank %d: dropped a stale %s", r.rank, type(answer).__name__)
        return out

    def _send_to(self, r: _Rank, messages: Sequence[control.Order]) -> None:
        self._write(r, control.encode(messages))

    def _write(self, r: _Rank, frame: bytes) -> None:
        stdin = r.process.stdin
        if stdin is None:
            return
        with r.write_lock:
            try:
                stdin.write(frame)
                stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                pass  # the rank is gone; _watch reports it

    def _read_answers(self, r: _Rank) -> None:
        stdout = r.process.stdout
        assert stdout is not None
        while True:
            try:
                messages = control.read_frame(stdout)
            except Exception:
                log.exception("rank %d: unreadable answer", r.rank)
                return
            if messages is None:
                return
            for m in messages:
                r.answers.put(m)

    def _pump_stderr(self, r: _Rank) -> None:
        stderr = r.process.stderr
        assert stderr is not None
        out = sys.stderr
        for raw in iter(stderr.readline, b""):
            line = raw.decode("utf-8", "replace")
            r.tail.append(line)
            try:
                out.write(f"rank {r.rank}: {line}")
                out.flush()
            except (OSError, ValueError):
                pass

    # -- spawning ------------------------------------------------------------------------

    def _spawn(self, rank: int) -> subprocess.Popen[bytes]:
        plan = self.plan
        host = plan.hosts[rank]
        variables = rank_environment(plan, rank, self.hostfile)
        command: Sequence[str] = module_command(FOLLOWER_MODULE)
        env = dict(os.environ)
        if host.local:
            env.update(variables)
        else:
            command = _ssh_command(host.ssh or "", variables, ring_addresses(plan), command)
        return subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            close_fds=True,
            # Out of the host's process group: a terminal's Ctrl-C or a host's
            # signal to the group reaches rank 0 alone, which ends the ranks
            # itself (a rank killed first would be reported as failed).
            start_new_session=True,
        )


def _ssh_command(
    host: str,
    variables: dict[str, str],
    ring: list[list[str]],
    command: Sequence[str],
) -> list[str]:
    """``ssh HOST sh -c '...'`` running the follower there with its variables
    (and the ring's address list written to a file of its own there), as
    ``mlx.launch`` does. The remote Python is the one at this one's path."""
    import json

    script = "set -e; "
    if "MLX_HOSTFILE" in variables:
        script += "f=$(mktemp); echo " + shlex.quote(json.dumps(ring)) + ' > "$f"; '
        variables = {**variables, "MLX_HOSTFILE": "$f"}
    for key, value in variables.items():
        quoted = '"$f"' if value == "$f" else shlex.quote(value)
        script += f"export {key}={quoted}; "
    script += "exec " + " ".join(shlex.quote(c) for c in command)
    return ["ssh", "-o", "BatchMode=yes", host, script]


def _describe_exit(code: int) -> str:
    if code < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _close_quietly(stream: Any) -> None:
    try:
        if stream is not None:
            stream.close()
    except OSError:
        pass
