"""The I/O-free heart of a worker connection, shared by ``Worker`` and ``AsyncWorker``.

``WorkerCore`` allocates request ids, encodes request lines, and routes the
worker's output to one ``Sink`` per request: raw chunks go in through
:meth:`WorkerCore.feed` (from whatever thread or task reads stdout), and each
sink gets its token batches (with the ``progress`` events of a stream that
asked for them, in order) and then exactly one end, a reply or an error; a
non-streaming request that asked for progress (``load``) gets its events
through :meth:`Sink.progress`.
It does no I/O; the lines it wants written back (cancels) are returned.

The supervisor always speaks the addressed dialect: every request carries an
integer id from this core, so every line of the worker names its request.

Protocol faults, and what they fail:

- **A line over the limit** whose ``id`` can still be read from its first
  bytes (the worker writes ``type`` and ``id`` first) fails only that request
  with :class:`ProtocolError`; the worker is asked to cancel it.
- **A non-JSON line, a non-object, or a line whose id is unknown** (never
  issued, or already ended) cannot be attributed to a request. It means the
  framing or the worker's bookkeeping is no longer trustworthy, and delivering
  a possibly misrouted line to a stream is worse than failing it. So every
  request in flight fails with :class:`ProtocolError` and is cancelled in the
  worker. The worker itself is kept: requests sent afterwards work if it
  still answers (a worker that died or hangs is caught by the crash and
  timeout paths).
- **A malformed line of a known request** (a reply of the wrong type, a
  missing field, a token for a non-streaming request, a ``progress`` line for
  a request that did not ask for it) fails that request.

A request the host gave up on (cancelled, timed out, or failed by a fault) is
*abandoned*: its id is remembered until its terminal line comes, and its late
lines are dropped quietly instead of counting as unknown ids.
"""

from __future__ import annotations

import functools
import itertools
import logging
import operator
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol, cast

import orjson

from protocol.codec import DEFAULT_MAX_LINE_BYTES, encode_wire
from protocol.errors import RankFailed, RequestId, WireError
from protocol.fields import JsonValue
from protocol.replies import NON_TERMINAL_TYPES, ErrorReply, ProgressEvent, Reply, TokenEvent
from protocol.reply_decode import parse_reply

from .commands import EXPECTED_REPLY, STREAMING
from .errors import ProtocolError, RequestError, SupervisorError, WorkerCrashed
from .framing import LineSplitter, OverlongLine
from .results import StreamItem, Token

__all__ = ["ErrorFactory", "Sink", "WorkerCore"]

log = logging.getLogger("supervisor")

ErrorFactory = Callable[[RequestId | None], SupervisorError]

# The worker's encoder writes "type" then "id" first; enough to attribute a
# line that is too long to decode.
_HEAD = re.compile(rb'^\{"type":"([a-z_]+)","id":(-?\d+|"(?:[^"\\]|\\.)*")')


class Sink(Protocol):
    """Receives one request's output. Called by :meth:`WorkerCore.feed`'s
    caller with the core's lock held: do not block, do not call back."""

    def tokens(self, batch: list[StreamItem]) -> None:
        """A stream's token events, and its progress events if it asked for
        them, in order; the sink may keep the list."""

    def progress(self, event: ProgressEvent) -> None:
        """A progress event of a non-streaming request that asked for them."""

    def finish(self, reply: Reply) -> None:
        """The terminal reply, of the type the command expects."""

    def fail(self, error: SupervisorError) -> None:
        """The request ended without its reply."""


class _Pending:
    __slots__ = ("id", "cmd", "sink", "buf", "streaming", "progress")

    def __init__(self, rid: RequestId, cmd: str, sink: Sink, progress: bool) -> None:
        self.id = rid
        self.cmd = cmd
        self.sink = sink
        self.buf: list[StreamItem] = []
        self.streaming = cmd in STREAMING
        self.progress = progress


def _decode_all(lines: list[bytes | OverlongLine]) -> list[Any] | None:
    """All lines decoded by one ``orjson.loads``, or None if they are not
    exactly one JSON value each."""
    try:
        objs = orjson.loads(b"[" + b",".join(lines) + b"]")  # type: ignore[arg-type]
    except (orjson.JSONDecodeError, TypeError):
        return None
    return objs if len(objs) == len(lines) else None


_get_id = operator.itemgetter("id")
_get_type = operator.itemgetter("type")
_get_token = operator.itemgetter("token")
_get_token_id = operator.itemgetter("token_id")
_make_token = functools.partial(tuple.__new__, Token)
_NONES = itertools.repeat(None)
_FOUR = {4}
_TOKEN = {"token"}
_INT = {int}


class WorkerCore:
    """Request bookkeeping for one worker process (a restart makes a new one)."""

    def __init__(self, *, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        # Reentrant: a finalizer run by the garbage collector inside ``feed``
        # (on the reader thread) may close the worker, which opens a ``quit``.
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._pending: dict[RequestId, _Pending] = {}
        self._abandoned: set[RequestId] = set()
        self._closed: ErrorFactory | None = None
        self._splitter = LineSplitter(max_line_bytes)
        self._cancels: list[RequestId] = []
        self.worker_max_line_bytes: int | None = None
        """The worker's own request-line limit, from its ``hello``."""
        self.protocol_faults = 0

    # -- requests ------------------------------------------------------------------

    def open(
        self, cmd: str, fields: Mapping[str, JsonValue] | None, sink: Sink
    ) -> tuple[int, bytes]:
        """Register a request; returns its id and the line to write."""
        rid = next(self._ids)
        request: dict[str, JsonValue] = {"cmd": cmd, "id": rid}
        if fields:
            request.update(fields)
            request["id"] = rid
            request["cmd"] = cmd
        line = encode_wire(request)
        limit = self.worker_max_line_bytes
        if limit is not None and len(line) - 1 > limit:
            raise RequestError(
                "line_too_long",
                f"{cmd}: request of {len(line) - 1} bytes is over the worker's limit of "
                f"{limit} bytes; it was not sent",
                request_id=rid,
            )
        with self._lock:
            if self._closed is not None:
                raise self._closed(rid)
            asked = bool(fields) and fields.get("progress") is True  # type: ignore[union-attr]
            self._pending[rid] = _Pending(rid, cmd, sink, asked)
        return rid, line

    def after_fork(self, make_error: ErrorFactory) -> None:
        """In a forked child of the host (see :mod:`supervisor.forks`): refuse
        every request with ``make_error`` and forget the parent's. Takes a new
        lock instead of the old one, which a thread that did not survive the
        fork may hold."""
        self._lock = threading.RLock()
        self._closed = make_error
        self._pending = {}
        self._abandoned = set()
        self._cancels = []

    @staticmethod
    def cancel_line(rid: RequestId) -> bytes:
        return encode_wire({"cmd": "cancel", "id": rid})

    def abandon(self, rid: RequestId) -> bool:
        """Stop routing ``rid``; its later lines are dropped. False if it had ended."""
        with self._lock:
            pending = self._pending.pop(rid, None)
            if pending is None:
                return False
            self._abandoned.add(rid)
            return True

    def is_open(self, rid: RequestId) -> bool:
        return rid in self._pending

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def fail(self, rid: RequestId, error: SupervisorError) -> bool:
        """End one request with ``error`` (and abandon it); False if it had ended."""
        with self._lock:
            pending = self._pending.pop(rid, None)
            if pending is None:
                return False
            self._abandoned.add(rid)
            self._flush(pending)
            pending.sink.fail(error)
            return True

    def fail_all(self, make_error: ErrorFactory, *, close: bool) -> list[RequestId]:
        """End every request in flight; with ``close``, refuse new ones too.

        Returns the ids that were in flight (to cancel, if the worker lives).
        """
        with self._lock:
            if close and self._closed is None:
                self._closed = make_error
            return self._fail_all(make_error)

    # -- output --------------------------------------------------------------------

    def feed(self, chunk: bytes) -> list[RequestId]:
        """Route the lines completed by ``chunk``. Returns the ids of requests
        failed by a protocol fault: the caller should send them ``cancel``."""
        lines = self._splitter.feed(chunk)
        if not lines:
            return []
        with self._lock:
            self._route(lines)
            cancels, self._cancels = self._cancels, []
            return cancels

    def end_of_output(self) -> None:
        """The worker's stdout closed. A last, unterminated line is dropped:
        the worker died while writing it, and its death is the error to report."""
        rest = self._splitter.end()
        if rest:
            size = rest.size if isinstance(rest, OverlongLine) else len(rest)
            log.warning("worker output ended inside a line (%d bytes dropped)", size)

    # -- routing (lock held) -------------------------------------------------------

    def _route(self, lines: list[bytes | OverlongLine]) -> None:
        """The hot path. A chunk of ordinary lines is decoded in one call, as
        a JSON array (a newline never occurs inside a JSON line, so each line
        is one element); the steady state of a stream, a chunk of plain tokens
        of one request, is then checked and delivered at C speed. Anything
        else goes object by object, and a chunk with an overlong, empty or
        non-JSON line is decoded line by line."""
        objs = _decode_all(lines)
        if objs is not None:
            if self._route_plain_tokens(objs):
                return
            pairs: Iterable[tuple[object, bytes]] = zip(
                objs, cast("list[bytes]", lines), strict=True
            )
        else:
            pairs = self._decode_each(lines)
        touched: list[_Pending] = []
        for obj, line in pairs:
            self._route_one(obj, line, touched)
        for p in touched:
            self._flush(p)

    def _route_plain_tokens(self, objs: list[Any]) -> bool:
        """Deliver ``objs`` if every one is a plain token (exactly ``type``,
        ``id``, ``token``, ``token_id``, well typed) of one streaming request
        in flight; each check is one ``map`` over the chunk. False (and
        nothing done) as soon as one check fails."""
        try:
            ids = set(map(_get_id, objs))
            if len(ids) != 1 or set(map(_get_type, objs)) != _TOKEN:
                return False
            if set(map(len, objs)) != _FOUR:
                return False
            texts = list(map(_get_token, objs))
            token_ids = list(map(_get_token_id, objs))
            "".join(texts)  # TypeError unless every text is a str
        except (KeyError, TypeError):
            return False
        rid = ids.pop()
        p = self._pending.get(rid) if type(rid) is int else None
        if p is None or not p.streaming or p.buf:
            return False
        if set(map(type, token_ids)) != _INT:
            return False
        p.sink.tokens(list(map(_make_token, zip(texts, token_ids, _NONES, _NONES, strict=False))))
        return True

    def _decode_each(self, lines: list[bytes | OverlongLine]) -> Iterator[tuple[object, bytes]]:
        for line in lines:
            if type(line) is not bytes:
                assert isinstance(line, OverlongLine)
                self._overlong(line)
            elif line:
                try:
                    yield orjson.loads(line), line
                except orjson.JSONDecodeError:
                    self._fault_all("the worker wrote a line that is not JSON", line)

    def _route_one(self, obj: object, line: bytes, touched: list[_Pending]) -> None:
        if type(obj) is not dict:
            self._fault_all("the worker wrote a line that is not a JSON object", line)
            return
        rid = obj.get("id")
        p = self._pending.get(rid) if type(rid) is int else None
        if p is None:
            self._stray(rid, obj.get("type"), line)
        elif (kind := obj.get("type")) == "progress":
            self._progress(p, obj, line, touched)
        elif kind != "token":
            self._terminal(p, obj, line)
        else:
            text = obj.get("token")
            token_id = obj.get("token_id")
            if type(text) is str and type(token_id) is int and len(obj) == 4 and p.streaming:
                token = Token(text, token_id)
            else:
                maybe = self._token(p, obj, line)
                if maybe is None:
                    return
                token = maybe
            if not p.buf:
                touched.append(p)
            p.buf.append(token)

    def _flush(self, p: _Pending) -> None:
        if p.buf:
            p.sink.tokens(p.buf)
            p.buf = []

    def _token(self, p: _Pending, obj: dict[str, object], line: bytes) -> Token | None:
        """The slow path: logprobs, or a malformed token line."""
        if not p.streaming:
            self._fault_one(
                p, f"the worker sent a token for {p.cmd!r}, which does not stream", line
            )
            return None
        try:
            event = parse_reply(obj)
        except WireError as exc:
            self._fault_one(p, f"malformed token line: {exc.message}", line)
            return None
        assert isinstance(event, TokenEvent)
        return Token(event.token, event.token_id, event.logprob, event.top_logprobs)

    def _progress(
        self, p: _Pending, obj: dict[str, object], line: bytes, touched: list[_Pending]
    ) -> None:
        """A progress event: in order with the tokens of a stream, at once for
        another request; a fault if the request did not ask for it."""
        if not p.progress:
            self._fault_one(p, f"the worker sent progress for {p.cmd!r}, which did not ask", line)
            return
        try:
            event = parse_reply(obj)
        except WireError as exc:
            self._fault_one(p, f"malformed progress line: {exc.message}", line)
            return
        assert isinstance(event, ProgressEvent)
        if p.streaming:
            if not p.buf:
                touched.append(p)
            p.buf.append(event)
        else:
            p.sink.progress(event)

    def _terminal(self, p: _Pending, obj: dict[str, object], line: bytes) -> None:
        try:
            reply = parse_reply(obj)
        except WireError as exc:
            self._fault_one(p, f"malformed reply: {exc.message}", line)
            return
        expected = EXPECTED_REPLY.get(p.cmd)
        if isinstance(reply, ErrorReply) and reply.code == RankFailed.CODE:
            # a rank of a sharded worker died; the worker exits next
            error: SupervisorError | None = WorkerCrashed(
                reply.message,
                exit_code=reply.exit_code,
                stderr_tail=reply.stderr_tail or "",
                request_id=p.id,
                rank=reply.rank,
            )
        elif isinstance(reply, ErrorReply):
            error = RequestError(reply.code, reply.message, request_id=p.id)
        elif expected is not None and not isinstance(reply, expected):
            self._fault_one(p, f"the worker answered {p.cmd!r} with {obj.get('type')!r}", line)
            return
        else:
            error = None
        del self._pending[p.id]
        self._flush(p)
        if error is None:
            p.sink.finish(reply)
        else:
            p.sink.fail(error)

    def _overlong(self, line: OverlongLine) -> None:
        self.protocol_faults += 1
        what = f"the worker wrote a line of {line.size} bytes, over the limit"
        m = _HEAD.match(line.head)
        if m is not None:
            raw_id = m.group(2)
            rid: object = int(raw_id) if raw_id[:1] != b'"' else orjson.loads(raw_id)
            terminal = m.group(1).decode() not in NON_TERMINAL_TYPES
            p = self._pending.get(rid) if type(rid) is int else None
            if p is not None:
                log.error("%s (request %r)", what, rid)
                self._fail_one(p, ProtocolError(what, line=line.head, request_id=p.id))
                if terminal:  # it ended: nothing to cancel, nothing more to expect
                    self._abandoned.discard(p.id)
                    self._cancels.remove(p.id)
                return
            if type(rid) is int and rid in self._abandoned:
                if terminal:
                    self._abandoned.discard(rid)
                return
        self._fault_all(what, line.head)

    def _stray(self, rid: object, kind: object, line: bytes) -> None:
        if type(rid) is int and rid in self._abandoned:
            if kind not in NON_TERMINAL_TYPES:
                self._abandoned.discard(rid)
            return
        self._fault_all(f"the worker wrote a line for an unknown request id {rid!r}", line)

    def _fault_one(self, p: _Pending, what: str, line: bytes) -> None:
        self.protocol_faults += 1
        log.error("protocol fault on request %r: %s: %r", p.id, what, line[:200])
        self._fail_one(p, ProtocolError(what, line=line, request_id=p.id))

    def _fail_one(self, p: _Pending, error: SupervisorError) -> None:
        del self._pending[p.id]
        self._abandoned.add(p.id)
        self._cancels.append(p.id)
        self._flush(p)
        p.sink.fail(error)

    def _fault_all(self, what: str, line: bytes) -> None:
        self.protocol_faults += 1
        log.error(
            "protocol fault: %s: %r; failing %d request(s) in flight",
            what,
            line[:200],
            len(self._pending),
        )

        def make(rid: RequestId | None) -> SupervisorError:
            return ProtocolError(what, line=line, request_id=rid)

        self._cancels.extend(self._fail_all(make))

    def _fail_all(self, make_error: ErrorFactory) -> list[RequestId]:
        failed = list(self._pending.values())
        self._pending.clear()
        for p in failed:
            self._abandoned.add(p.id)
            self._flush(p)
            p.sink.fail(make_error(p.id))
        return [p.id for p in failed]
