"""The mock's faults: what they are, how a request sets them, what they do.

``Faults`` holds one setting per fault. The command line gives the
process-wide defaults; a request's ``mock`` object overrides them for that
request only (``Faults.override``). The effects (``crash``, ``block_forever``,
``flood_stderr``) act on the whole process, as a real failure would.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NoReturn

from protocol.errors import ERROR_CODES, RequestId
from protocol.fields import Fields, JsonValue

log = logging.getLogger("mock_worker")

GARBAGE_LINE = b"this is not json\n"


@dataclass(frozen=True, slots=True, kw_only=True)
class Faults:
    """Per-request behaviour of the scripted engine. ``None`` turns a fault off.

    The ``*_after`` counts are tokens already written; they fire before
    the next token, so they need ``max_tokens`` greater than the count.
    """

    token_delay: float = 0.0  # seconds to sleep before each token
    load_delay: float = 0.0  # seconds a load takes
    eos_after: int | None = None  # end with EOS (finish_reason "stop") after K tokens
    crash_after: int | None = None  # exit the process with exit_code after K tokens
    exit_code: int = 1
    hang_after: int | None = None  # after K tokens, never write for this request again
    garbage_after: int | None = None  # after K tokens, write one non-JSON line
    stderr_flood: int = 0  # bytes of log-like text written to stderr before generating
    fail_load: str | None = None  # error code that load fails with
    ignore_cancel: bool = False  # a cancelled generation never finishes

    def override(self, raw: Mapping[str, JsonValue] | None, request_id: RequestId | None) -> Faults:
        """These defaults with a request's ``mock`` object applied on top
        (a key set to null turns that fault off)."""
        if not raw:
            return self
        f = Fields(raw, prefix="mock.", request_id=request_id)
        unknown = sorted(set(raw) - set(FAULT_NAMES))
        if unknown:
            raise f.fail(unknown[0], f"unknown mock option; known: {', '.join(FAULT_NAMES)}")
        changes: dict[str, object] = {k: _OFF[k] for k, v in raw.items() if v is None}
        for name in ("token_delay", "load_delay"):
            if f.has(name):
                changes[name] = f.number(name, 0.0, minimum=0.0)
        for name in ("eos_after", "crash_after", "hang_after", "garbage_after"):
            if f.has(name):
                changes[name] = f.int_(name, minimum=0)
        if f.has("exit_code"):
            changes["exit_code"] = f.int_("exit_code", minimum=0, maximum=255)
        if f.has("stderr_flood"):
            changes["stderr_flood"] = f.int_("stderr_flood", minimum=0)
        if f.has("ignore_cancel"):
            changes["ignore_cancel"] = f.bool_("ignore_cancel", False)
        if f.has("fail_load"):
            code = f.str_("fail_load")
            if code not in ERROR_CODES:
                raise f.fail("fail_load", f"must be an error code, one of {', '.join(ERROR_CODES)}")
            changes["fail_load"] = code
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


FAULT_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Faults))
_OFF: dict[str, object] = {name: getattr(Faults(), name) for name in FAULT_NAMES}


def crash(exit_code: int, why: str) -> NoReturn:
    """Exit at once, as a crash would: no terminal lines, no clean-up."""
    log.error("mock fault: %s; exiting with code %d", why, exit_code)
    logging.shutdown()
    os._exit(exit_code)


def block_forever(why: str) -> NoReturn:
    """Stop the calling thread for good (the engine thread: a hung model)."""
    log.warning("mock fault: %s; this thread now blocks forever", why)
    while True:
        threading.Event().wait()


def flood_stderr(size: int) -> None:
    """Write ``size`` bytes of log-like lines straight to fd 2."""
    written = 0
    line_no = 0
    while written < size:
        lines = []
        for _ in range(512):
            line_no += 1
            lines.append(
                f"mock_worker WARNING: stderr flood line {line_no:09d}: "
                "the quick brown fox jumps over the lazy dog\n"
            )
        block = "".join(lines).encode()[: size - written]
        view = memoryview(block)
        while view:
            view = view[os.write(2, view) :]
        written += len(block)
