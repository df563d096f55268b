"""Run the table: one worker per group, a deadline per case, a result per case.

For each group the runner spawns the worker command and runs the setup
(``hello``; then ``load`` when the group needs the model), then the cases in
order (a ``same_worker`` group goes on with the previous group's worker).
Every case has ``timeout`` seconds: all waits inside it are bounded by that
deadline, and a watchdog kills the worker a few seconds after it in case
something still blocks. After a case that passed, a ``ping`` round trip
(:meth:`~.session.Session.sync`) checks that nothing was left unanswered or
written unasked. A failed case kills its worker; the next case gets a fresh
one. A setup that fails fails the rest of its group without retrying, so a
dead or hung worker costs one timeout per group, not per case.
"""

from __future__ import annotations

import pathlib
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from .checker import ReplyChecker
from .process import WorkerProcess
from .session import CaseFailed, CaseSkipped, Session
from .table import Case, Group

__all__ = ["Result", "RunConfig", "run"]

Status = Literal["PASS", "FAIL", "SKIP"]

WATCHDOG_GRACE_S: Final = 5.0
STDERR_SHOWN: Final = 3000


@dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    group: str
    case: str
    status: Status
    seconds: float
    note: str
    transcript: tuple[str, ...] = ()
    stderr_tail: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class RunConfig:
    command: Sequence[str]
    env: Mapping[str, str]
    checker: ReplyChecker
    model_path: str | None
    model_note: str
    scratch: pathlib.Path
    timeout: float


def run(groups: Sequence[Group], config: RunConfig, emit: Callable[[Result], None]) -> list[Result]:
    results: list[Result] = []

    def record(result: Result) -> None:
        results.append(result)
        emit(result)

    session: Session | None = None
    try:
        for group in groups:
            if not group.same_worker or (
                group.model and (session is None or session.loaded is None)
            ):
                _retire(session, gently=True)
                session = None
            session = _GroupRun(group, config, record, session).run()
    finally:
        _retire(session, gently=True)
    return results


def _retire(session: Session | None, *, gently: bool) -> None:
    if session is None:
        return
    if gently and session.proc.proc.poll() is None:
        session.proc.close_stdin()
        session.proc.wait(time.monotonic() + 3.0)
    session.proc.close()


class _GroupRun:
    def __init__(
        self,
        group: Group,
        config: RunConfig,
        record: Callable[[Result], None],
        session: Session | None,
    ) -> None:
        self.group = group
        self.config = config
        self.record = record
        self.session = session
        self.setup_failed = False

    def run(self) -> Session | None:
        """Run the cases; returns the worker, still running, for a ``same_worker`` group."""
        try:
            for case in self.group.cases:
                self._case(case)
        except BaseException:
            self._retire(gently=False)
            raise
        return self.session

    def _result(self, case: Case, status: Status, seconds: float, note: str) -> None:
        transcript: tuple[str, ...] = ()
        stderr = ""
        if status == "FAIL" and self.session is not None:
            transcript = tuple(self.session.proc.transcript)
            stderr = self.session.proc.stderr_tail[-STDERR_SHOWN:]
        self.record(
            Result(
                group=self.group.name,
                case=case.name,
                status=status,
                seconds=seconds,
                note=note,
                transcript=transcript,
                stderr_tail=stderr,
            )
        )

    def _case(self, case: Case) -> None:
        if self.group.model and self.config.model_path is None:
            self._result(case, "SKIP", 0.0, f"no model: {self.config.model_note}")
            return
        if self.setup_failed:
            self._result(case, "FAIL", 0.0, "not run: this group's setup failed (see above)")
            return
        start = time.monotonic()
        if self.session is None:
            try:
                self.session = self._start()
            except CaseFailed as exc:
                self.setup_failed = True
                self._result(case, "FAIL", time.monotonic() - start, f"setup: {exc}")
                self._retire(gently=False)
                return
        session = self.session
        start = time.monotonic()
        session.deadline = start + self.config.timeout
        watchdog = threading.Timer(self.config.timeout + WATCHDOG_GRACE_S, session.proc.kill)
        watchdog.daemon = True
        watchdog.start()
        status: Status = "PASS"
        try:
            note = case.run(session) or ""
            if case.ends_worker:
                if not session.ended:
                    raise CaseFailed("internal: the case did not end the worker")
            else:
                session.sync()
        except CaseSkipped as exc:
            status, note = "SKIP", str(exc)
        except CaseFailed as exc:
            status, note = "FAIL", str(exc)
        except Exception as exc:  # a bug in a case, or a reply shape it did not foresee
            status = "FAIL"
            note = f"kit error {type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        finally:
            watchdog.cancel()
        self._result(case, status, time.monotonic() - start, note)
        if status == "SKIP":
            try:
                session.sync()
            except CaseFailed:
                self._retire(gently=False)
        if status == "FAIL" or case.ends_worker:
            self._retire(gently=False)

    def _start(self) -> Session:
        try:
            proc = WorkerProcess(self.config.command, env=self.config.env)
        except OSError as exc:
            raise CaseFailed(f"cannot start the worker: {exc}") from None
        session = Session(
            proc,
            self.config.checker,
            model_path=self.config.model_path,
            scratch=self.config.scratch,
        )
        self.session = session
        session.deadline = time.monotonic() + self.config.timeout
        hello = session.call({"cmd": "hello", "id": "kit-hello"})
        session.hello_ms = (time.monotonic() - proc.started) * 1000
        if hello["type"] != "hello":
            raise CaseFailed(f"hello was answered with {hello}")
        session.hello = hello
        if self.group.model:
            assert self.config.model_path is not None
            loaded = session.call({"cmd": "load", "id": "kit-load", "path": self.config.model_path})
            if loaded["type"] != "loaded":
                raise CaseFailed(f"load of {self.config.model_path} was answered with {loaded}")
            session.loaded = loaded
        session.sync()
        return session

    def _retire(self, *, gently: bool) -> None:
        session, self.session = self.session, None
        _retire(session, gently=gently)
