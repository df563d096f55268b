"""One conversation with the worker under test, and the rules every line must keep.

:class:`Session` sends requests and reads replies for the cases. Every line
it reads is decoded, checked (schema and decoder, see :mod:`.checker`) and
routed:

- a line with an ``id`` belongs to the addressed request in flight with that
  id, and the id must come back with the JSON type it was sent with; a line
  for an id that has no request in flight (never sent, already answered, or
  a ``cancel``) is a failure;
- only ``generate`` and ``chat`` may get ``token`` lines; any other line is
  the request's one terminal line, and it must be of the type the command
  answers with (``ping`` → ``pong``, ...) or an ``error``;
- a line without ``id`` goes to a queue of legacy replies, which the case
  that expects them takes from; the runner's :meth:`Session.sync` after each
  case fails on any left over (a reply to a ``cancel``, an extra line after a
  legacy ``done``), and on any addressed request still without its terminal
  line;
- nothing may follow ``bye``.

Every wait is bounded by the case's deadline; a timeout or the end of the
worker's output fails the case with what was awaited.
"""

from __future__ import annotations

import collections
import itertools
import pathlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from .checker import ReplyChecker
from .matching import mismatches
from .process import WorkerProcess, shorten

__all__ = [
    "REPLY_TYPE",
    "CaseFailed",
    "CaseSkipped",
    "Exchange",
    "Line",
    "Session",
    "fail",
    "text_of",
    "token_ids",
]

Line = dict[str, Any]

REPLY_TYPE: Final[Mapping[str, str]] = {
    "hello": "hello",
    "ping": "pong",
    "load": "loaded",
    "unload": "unloaded",
    "generate": "done",
    "chat": "done",
    "info": "info",
    "tokenize": "tokens",
    "detokenize": "text",
    "inspect": "inspected",
    "quit": "bye",
}
"""The terminal reply type of each command (besides ``error``)."""

STREAMING: Final = frozenset({"generate", "chat"})
PROGRESS_COMMANDS: Final = frozenset({"generate", "chat", "load"})
"""The commands that may ask for ``progress`` lines (``"progress": true``)."""


class CaseFailed(Exception):
    """The worker broke a rule; the message says which, with the evidence."""


class CaseSkipped(Exception):
    """The case cannot run against this worker (no model, a vision model, ...)."""


def fail(message: str) -> CaseFailed:
    return CaseFailed(message)


def text_of(lines: list[Line]) -> str:
    return "".join(line["token"] for line in lines if line.get("type") == "token")


def token_ids(lines: list[Line]) -> list[int]:
    return [line["token_id"] for line in lines if line.get("type") == "token"]


def _key(rid: object) -> tuple[str, object]:
    return ("int" if isinstance(rid, int) else "str", rid)


def _show(line: Mapping[str, object]) -> str:
    return shorten(orjson.dumps(line))


@dataclass(slots=True, kw_only=True)
class Exchange:
    """One addressed request and every line that answered it."""

    request: Mapping[str, object]
    lines: list[Line] = field(default_factory=list)
    terminal: Line | None = None
    terminal_seq: int = -1
    """Position of the terminal line among all lines read in this session."""
    duplicates: int = 0
    duplicate_errors: list[Line] = field(default_factory=list)

    @property
    def id(self) -> str | int:
        rid = self.request["id"]
        assert isinstance(rid, str | int)
        return rid

    @property
    def cmd(self) -> str:
        return str(self.request.get("cmd"))

    @property
    def label(self) -> str:
        """``generate id 'g-1'``, or ``legacy generate``."""
        rid = self.request.get("id")
        return f"legacy {self.cmd}" if rid is None else f"{self.cmd} id {rid!r}"

    @property
    def tokens(self) -> list[Line]:
        return [line for line in self.lines if line.get("type") == "token"]

    @property
    def progress(self) -> list[Line]:
        return [line for line in self.lines if line.get("type") == "progress"]


class Session:
    """The kit's side of the wire, for one worker process."""

    def __init__(
        self,
        proc: WorkerProcess,
        checker: ReplyChecker,
        *,
        model_path: str | None,
        scratch: pathlib.Path,
    ) -> None:
        self.proc = proc
        self.checker = checker
        self.model_path = model_path
        self.scratch = scratch
        self.deadline = time.monotonic() + 30.0
        self.hello: Line | None = None
        self.hello_ms = 0.0
        self.loaded: Line | None = None
        self.memo: dict[str, Any] = {}
        self.ended = False
        self._pending: dict[tuple[str, object], Exchange] = {}
        self._unaddressed: collections.deque[Line] = collections.deque()
        self._seq = 0
        self._bye: Line | None = None
        self._eof = False
        self._ids = itertools.count(1)
        self.read_order: list[tuple[object, str]] = []
        """``(id, type)`` of every addressed line read, in order (to see interleaving)."""

    # -- ids ---------------------------------------------------------------------------

    def fresh_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    def fresh_int(self) -> int:
        return 1000 + next(self._ids)

    # -- sending -------------------------------------------------------------------------

    def send(self, request: Mapping[str, object]) -> Exchange | None:
        """Send one request; an addressed one (readable id, not ``cancel``) is tracked."""
        self.proc.write(orjson.dumps(request) + b"\n")
        return self.track(request)

    def track(self, request: Mapping[str, object]) -> Exchange | None:
        """Expect a terminal line for ``request`` (already written, e.g. by ``send_raw``)."""
        rid = request.get("id")
        if (
            request.get("cmd") == "cancel"
            or isinstance(rid, bool)
            or not isinstance(rid, str | int)
        ):
            return None
        key = _key(rid)
        exchange = Exchange(request=request)
        if key in self._pending:  # a duplicate_id test: one error line for it, then the original
            self._pending[key].duplicates += 1
            return None
        self._pending[key] = exchange
        return exchange

    def send_raw(self, data: bytes, *, note: str | None = None) -> None:
        """Write bytes as they are (bad lines, go-mlx's exact encoding); nothing is tracked."""
        self.proc.write(data, note=note)

    def cancel(self, rid: str | int | None = None) -> None:
        self.send({"cmd": "cancel"} if rid is None else {"cmd": "cancel", "id": rid})

    def close_stdin(self) -> None:
        self.proc.close_stdin()

    # -- reading -------------------------------------------------------------------------

    def read(self, waiting_for: str) -> Line:
        """The next line, checked and routed. Fails on timeout and end of output."""
        if self._eof:
            raise fail(f"the worker's output had already ended, waiting for {waiting_for}")
        try:
            raw = self.proc.read_line(self.deadline)
        except TimeoutError:
            raise fail(f"timed out waiting for {waiting_for}") from None
        if raw is None:
            self._eof = True
            status = self.proc.wait(time.monotonic() + 2.0)
            why = " (the kit killed it: the case overran)" if self.proc.killed else ""
            raise fail(
                f"the worker's output ended (exit status {status}){why}, waiting for {waiting_for}"
            )
        return self._accept(raw)

    def _accept(self, raw: bytes) -> Line:
        if not raw.endswith(b"\n"):
            raise fail(f"the last output line has no newline: {shorten(raw)}")
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise fail(f"stdout carried a line that is not JSON ({exc}): {shorten(raw)}") from None
        problem = self.checker.check(raw, line)
        if problem is not None:
            raise fail(f"invalid reply line: {problem}\n  line: {shorten(raw)}")
        assert isinstance(line, dict)
        self._seq += 1
        if self._bye is not None:
            raise fail(f"a line after bye: {shorten(raw)}")
        if "id" not in line:
            self._unaddressed.append(line)
            return line
        self._route(line)
        return line

    def _route(self, line: Line) -> None:
        rid = line["id"]
        exchange = self._pending.get(_key(rid))
        if exchange is None:
            hint = ""
            for pending in self._pending.values():
                if pending.id != rid and str(pending.id) == str(rid):
                    hint = f" (the request's id was {pending.id!r}: the JSON type changed)"
            raise fail(
                f"a line for id {rid!r}, which has no request in flight{hint}: {_show(line)}"
            )
        kind = line["type"]
        self.read_order.append((rid, kind))
        if kind == "token":
            if exchange.cmd not in STREAMING:
                raise fail(f"a token line for a {exchange.cmd!r} request: {_show(line)}")
            exchange.lines.append(line)
            return
        if kind == "progress":
            if exchange.request.get("progress") is not True:
                raise fail(
                    f"a progress line for {exchange.label}, which did not ask for progress:"
                    f" {_show(line)}"
                )
            if exchange.cmd not in PROGRESS_COMMANDS:
                raise fail(f"a progress line for a {exchange.cmd!r} request: {_show(line)}")
            exchange.lines.append(line)
            return
        if exchange.duplicates and kind == "error" and line.get("code") == "duplicate_id":
            exchange.duplicates -= 1
            exchange.duplicate_errors.append(line)
            return
        expected = REPLY_TYPE.get(exchange.cmd)
        if kind not in ("error", expected):
            raise fail(
                f"{exchange.cmd!r} (id {rid!r}) answered with a {kind!r} line"
                f" (expected {expected!r} or 'error'): {_show(line)}"
            )
        exchange.lines.append(line)
        exchange.terminal = line
        exchange.terminal_seq = self._seq
        del self._pending[_key(rid)]
        if kind == "bye":
            self._bye = line

    def wait(self, *exchanges: Exchange | None) -> None:
        """Read until each of ``exchanges`` has its terminal line."""
        for exchange in exchanges:
            if exchange is None:
                raise fail("internal: waiting on a request that is not tracked")
            while exchange.terminal is None:
                self.read(f"the terminal line of {exchange.cmd!r} id {exchange.id!r}")

    def wait_tokens(self, exchange: Exchange | None, count: int = 1) -> None:
        """Read until ``exchange`` has ``count`` token lines (fails if it ends first)."""
        assert exchange is not None
        while len(exchange.tokens) < count:
            if exchange.terminal is not None:
                raise fail(
                    f"{exchange.cmd} id {exchange.id!r} ended before {count} token(s):"
                    f" {_show(exchange.terminal)}"
                )
            self.read(f"token {len(exchange.tokens) + 1} of id {exchange.id!r}")

    def wait_duplicate_error(self, exchange: Exchange | None) -> Line:
        """Read until the ``duplicate_id`` error for a second request with ``exchange``'s id."""
        assert exchange is not None
        while not exchange.duplicate_errors:
            if exchange.terminal is not None:
                raise fail(
                    f"id {exchange.id!r} was still in flight but its reuse got no duplicate_id"
                    f" error; instead: {_show(exchange.terminal)}"
                )
            self.read(f"a duplicate_id error for id {exchange.id!r}")
        return exchange.duplicate_errors[0]

    def call(self, request: Mapping[str, object]) -> Line:
        """An addressed non-streaming request and its one reply line."""
        exchange = self.send(request)
        self.wait(exchange)
        assert exchange is not None and exchange.terminal is not None
        return exchange.terminal

    def stream(self, request: Mapping[str, object]) -> Exchange:
        """An addressed request, read to its terminal line."""
        exchange = self.send(request)
        self.wait(exchange)
        assert exchange is not None
        return exchange

    def next_unaddressed(self, waiting_for: str) -> Line:
        while not self._unaddressed:
            self.read(waiting_for)
        return self._unaddressed.popleft()

    def legacy(self, request: Mapping[str, object], *, raw: bytes | None = None) -> Exchange:
        """A request without id, read to its terminal line (the id-less lines that
        answer it). ``raw``: the exact bytes to write for it (go-mlx's encoding)."""
        if self._unaddressed:
            raise fail(f"an id-less line nobody asked for: {_show(self._unaddressed[0])}")
        if raw is None:
            self.send(request)
        else:
            self.send_raw(raw)
        exchange = Exchange(request=request)
        self.read_legacy(exchange)
        return exchange

    def read_legacy(self, exchange: Exchange, *, until_tokens: int | None = None) -> None:
        """Read id-less lines into ``exchange`` until its terminal line, or until it
        has ``until_tokens`` token lines."""
        while exchange.terminal is None:
            if until_tokens is not None and len(exchange.tokens) >= until_tokens:
                return
            line = self.next_unaddressed(f"the reply to a {exchange.label}")
            exchange.lines.append(line)
            kind = line["type"]
            if kind == "token":
                if exchange.cmd not in STREAMING:
                    raise fail(f"a token line for a {exchange.label}: {_show(line)}")
                continue
            expected = REPLY_TYPE.get(exchange.cmd)
            if kind not in ("error", expected):
                raise fail(
                    f"a {exchange.label} answered with a {kind!r} line"
                    f" (expected {expected!r} or 'error'): {_show(line)}"
                )
            exchange.terminal = line
            exchange.terminal_seq = self._seq
        if until_tokens is not None and len(exchange.tokens) < until_tokens:
            raise fail(
                f"{exchange.label} ended before {until_tokens} token(s): {_show(exchange.terminal)}"
            )

    def legacy_call(self, request: Mapping[str, object], *, raw: bytes | None = None) -> Line:
        """A non-streaming request without id and its one reply line."""
        exchange = self.legacy(request, raw=raw)
        assert exchange.terminal is not None
        if len(exchange.lines) != 1:
            raise fail(f"{exchange.label}: expected one line, got {len(exchange.lines)}")
        return exchange.terminal

    def expect(self, line: Mapping[str, object], pattern: Mapping[str, object], what: str) -> None:
        problems = mismatches(pattern, line)
        if problems:
            raise fail(f"{what}: {'; '.join(problems)}\n  line: {_show(line)}")

    # -- barriers and the end ----------------------------------------------------------

    def sync(self) -> None:
        """A ``ping`` round trip; then nothing may be pending or left unread."""
        probe = self.send({"cmd": "ping", "id": self.fresh_id("sync")})
        self.wait(probe)
        if self._unaddressed:
            lines = "\n  ".join(_show(line) for line in self._unaddressed)
            raise fail(f"id-less line(s) nobody asked for:\n  {lines}")
        if self._pending:
            ids = ", ".join(f"{e.cmd} {e.id!r}" for e in self._pending.values())
            raise fail(f"no terminal line for: {ids}")

    def expect_end(self, *, within: float) -> tuple[int, float]:
        """Read to the end of output (every pending request must be answered by
        then), then the exit status; returns it with the seconds it took."""
        start = time.monotonic()
        while not self._eof:
            try:
                raw = self.proc.read_line(self.deadline)
            except TimeoutError:
                raise fail("timed out waiting for the worker's output to end") from None
            if raw is None:
                self._eof = True
                break
            self._accept(raw)
        if self._unaddressed:
            raise fail(f"id-less line(s) nobody asked for: {_show(self._unaddressed[0])}")
        if self._pending:
            ids = ", ".join(f"{e.cmd} {e.id!r}" for e in self._pending.values())
            raise fail(f"the output ended without a terminal line for: {ids}")
        status = self.proc.wait(min(self.deadline, start + within))
        elapsed = time.monotonic() - start
        self.ended = True
        if status is None:
            raise fail(f"the worker had not exited {within:g} s after its output ended")
        if status != 0:
            raise fail(f"exit status {status}, expected 0")
        return status, elapsed

    @property
    def bye(self) -> Line | None:
        return self._bye

    @property
    def seq(self) -> int:
        """How many lines this session has read."""
        return self._seq
