"""Route decoded requests: answer the cheap ones at once, queue the rest.

Runs on the stdin thread. ``hello``, ``ping``, ``info`` and ``cancel`` are
answered here, immediately, even while the engine thread is busy; model work
goes to the scheduler in arrival order.

No line can end the process: a failure that is not a :class:`WireError` (a
bug) is logged with its traceback and answered with ``internal`` for that
line's id, and the next line is read as usual. Unknown request fields are
logged (each name once per request) and ignored, or refused under
``--strict``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from bridge.engines.engine_protocol import Engine
from bridge.loop.jobs import Job
from bridge.loop.scheduler import info_reply
from bridge.loop.scheduling import Scheduler
from bridge.loop.stdio import LineWriter, Oversized
from protocol.codec import decode_json, decode_request_checked
from protocol.errors import Internal, LineTooLong, RequestId, WireError
from protocol.replies import ErrorReply, HelloReply, Pong
from protocol.requests import (
    Cancel,
    Chat,
    Detokenize,
    Generate,
    Hello,
    Info,
    Inspect,
    Load,
    Ping,
    Quit,
    Tokenize,
    Unload,
    field_list,
)

log = logging.getLogger("bridge.router")

HelloFactory = Callable[[RequestId | None], HelloReply]


class Router:
    def __init__(
        self,
        *,
        engine: Engine,
        scheduler: Scheduler,
        writer: LineWriter,
        hello: HelloFactory,
        max_line_bytes: int,
        strict: bool = False,
    ) -> None:
        self._engine = engine
        self._scheduler = scheduler
        self._writer = writer
        self._hello = hello
        self._max_line_bytes = max_line_bytes
        self._strict = strict

    def dispatch(self, line: bytes | Oversized) -> Quit | None:
        """Handle one input line; returns the ``Quit`` request when it is one."""
        try:
            if isinstance(line, Oversized):
                raise LineTooLong(
                    f"line of {line.size} bytes is over the limit of "
                    f"{self._max_line_bytes} bytes (--max-line-bytes)"
                )
            request, unknown = decode_request_checked(line, strict=self._strict)
            if unknown:
                log.warning(
                    "request %s: ignored unknown field(s): %s",
                    "without id" if request.id is None else repr(request.id),
                    field_list(unknown),
                )
            match request:
                case Quit():
                    return request
                case Hello():
                    self._writer.send(self._hello(request.id))
                case Ping():
                    self._writer.send(Pong(id=request.id))
                case Info() if not self._scheduler.model_change_pending():
                    self._writer.send(info_reply(self._engine, request, self._scheduler.stats()))
                case Cancel():
                    self._scheduler.cancel(request.id)
                case (
                    Load()
                    | Unload()
                    | Generate()
                    | Chat()
                    | Tokenize()
                    | Detokenize()
                    | Inspect()
                    | Info()
                ):
                    # info waits its turn only behind a load/unload that changes the model
                    self._scheduler.submit(
                        Job(request=request, send=self._writer.send, write=self._writer.write)
                    )
        except WireError as exc:
            log.debug("rejected line: %s", exc)
            self._writer.send(ErrorReply.of(exc))
        except Exception as exc:  # a bug: answer this line, keep reading the next
            log.exception("unexpected failure handling a request line")
            error = Internal(f"{type(exc).__name__}: {exc}", request_id=_readable_id(line))
            self._writer.send(ErrorReply.of(error))
        return None


def _readable_id(line: bytes | Oversized) -> RequestId | None:
    """The line's request id, when it has a readable one."""
    if isinstance(line, Oversized):
        return None
    try:
        raw = decode_json(line)
    except Exception:
        return None
    rid = raw.get("id") if isinstance(raw, dict) else None
    if isinstance(rid, str) or (isinstance(rid, int) and not isinstance(rid, bool)):
        return rid
    return None
