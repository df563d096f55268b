"""One real worker driven with arbitrary input lines, and the invariants it must keep.

``FuzzWorker.exchange(lines)`` sends a batch of raw lines to one ``python -m
bridge`` (the tiny model loaded), then a sentinel request, and reads until the
sentinel and every request of the batch have their terminal line; then one
more request (the barrier) whose reply comes after everything the worker
wrote for the batch (a line for an ended request would come before it). The
worker batches: lines of different requests in flight interleave, and a
``tokenize`` sentinel does not wait for running generations, so neither
closes the batch alone. It returns the violations it saw, as readable strings
(an empty list: all held):

- the worker stays alive (and answers the sentinel);
- stdout carries only JSON lines, each a reply the schema accepts;
- every request gets exactly one terminal line: its reply, ``done`` or
  ``error`` (``cancel`` never gets one, blank lines are ignored, a line that
  is not a request gets one ``error`` without ``id``), ``token`` lines
  only for ``generate`` and ``chat``, ``progress`` lines (not terminal) only
  for addressed ``generate``/``chat``/``load`` requests that asked
  (``"progress": true``), and no line for a request after its terminal line;
- no ``internal`` error code, whatever came in.

What each line must get is worked out from the line alone, the way the
worker's reader sees it (``classify``), from the spec in docs/protocol.md.
Requests may carry hostile values and be interleaved with ``cancel`` and
duplicate ids; ``quit`` is tested separately (it ends the worker).

``Stats`` counts what went through (lines, requests, terminal lines, codes),
for the long run's figures (bench/reliability_long.py).
"""

from __future__ import annotations

import contextlib
import enum
import os
import queue
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil

from protocol.conformance.session import PROGRESS_COMMANDS, REPLY_TYPE, STREAMING
from tests.harness import ROOT, Line, worker_env
from tests.schema_check import validate_reply

# The fuzzed worker's line limit: well below the default 64 MiB, so lines near and
# over it are cheap to make, and above every hostile value (200 KB of nesting).
MAX_LINE_BYTES = 256 * 1024

MODEL_CHANGING = frozenset({"load", "unload"})
# After the clean-up cancel, how long the cancelled requests may take to end
# (a prefill chunk of a long prompt on a loaded 2-core machine).
CANCEL_GRACE_S = 30.0


class Kind(enum.Enum):
    BLANK = "blank"  # ignored: no reply
    OVERSIZED = "oversized"  # one id-less line_too_long
    NOT_JSON = "not_json"  # one id-less invalid_json (not UTF-8, not JSON, not an object)
    BAD_ID = "bad_id"  # one id-less invalid_request (the id is unreadable)
    LEGACY = "legacy"  # a request without id: one id-less terminal line
    ADDRESSED = "addressed"  # a request with id: one terminal line with that id
    CANCEL = "cancel"  # never answered
    QUIT = "quit"  # ends the worker


@dataclass(frozen=True, slots=True)
class Sent:
    """What one input line is, as the worker must read it."""

    kind: Kind
    cmd: object = None
    id: object = None
    progress: bool = False  # "progress": true

    @property
    def may_progress(self) -> bool:
        """Whether ``progress`` lines may come for it (addressed, and it asked)."""
        return (
            self.kind is Kind.ADDRESSED
            and self.progress
            and isinstance(self.cmd, str)
            and self.cmd in PROGRESS_COMMANDS
        )

    @property
    def allowed(self) -> frozenset[str]:
        """Terminal reply types this request may get."""
        reply = REPLY_TYPE.get(self.cmd) if isinstance(self.cmd, str) else None
        return frozenset({"error", reply} if reply else {"error"})


def readable_id(value: object) -> bool:
    return value is None or isinstance(value, str) or type(value) is int


def classify(line: bytes, max_line_bytes: int = MAX_LINE_BYTES) -> Sent:
    """What the worker must make of ``line`` (one line, ending in ``\\n``)."""
    body = line[:-1] if line.endswith(b"\n") else line
    # The limit excludes the line ending, and "\r\n" is a line ending.
    length = len(body) - 1 if body.endswith(b"\r") else len(body)
    if length > max_line_bytes:
        return Sent(Kind.OVERSIZED)
    if not body.strip():
        return Sent(Kind.BLANK)
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return Sent(Kind.NOT_JSON)
    if not isinstance(obj, dict):
        return Sent(Kind.NOT_JSON)
    rid = obj.get("id")
    if not readable_id(rid):
        return Sent(Kind.BAD_ID)
    cmd = obj.get("cmd")
    if cmd == "cancel":
        return Sent(Kind.CANCEL, cmd, rid)
    if cmd == "quit":
        return Sent(Kind.QUIT, cmd, rid)
    return Sent(
        Kind.LEGACY if rid is None else Kind.ADDRESSED, cmd, rid, obj.get("progress") is True
    )


@dataclass
class Stats:
    """What went through the worker (for the long run's report)."""

    lines: int = 0
    requests: int = 0
    terminal_lines: int = 0
    token_lines: int = 0
    examples: int = 0
    restarts: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    violations: Counter[str] = field(default_factory=Counter)
    internal_messages: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "lines": self.lines,
            "requests": self.requests,
            "terminal_lines": self.terminal_lines,
            "token_lines": self.token_lines,
            "examples": self.examples,
            "worker_restarts": self.restarts,
            "error_codes": dict(sorted(self.codes.items())),
            "internal_codes": self.codes.get("internal", 0),
            "internal_messages": dict(self.internal_messages.most_common(20)),
            "violations": dict(self.violations.most_common()),
        }


@dataclass
class _Expected:
    """The requests sent under one id (or without id, for ``None``)."""

    sent: list[tuple[Sent, bytes]] = field(default_factory=list)
    terminals: list[Line] = field(default_factory=list)
    tokens_after_end: int = 0
    progress_after_end: int = 0

    @property
    def count(self) -> int:
        return len(self.sent)

    @property
    def missing(self) -> int:
        return max(0, self.count - len(self.terminals))

    @property
    def streams(self) -> bool:
        return any(isinstance(s.cmd, str) and s.cmd in STREAMING for s, _ in self.sent)

    @property
    def may_progress(self) -> bool:
        return any(s.may_progress for s, _ in self.sent)

    @property
    def allowed(self) -> frozenset[str]:
        out: frozenset[str] = frozenset()
        for s, _ in self.sent:
            out |= s.allowed
        return out


def _key(rid: object) -> tuple[str, object]:
    """A dict key that keeps 1 and "1" apart (JSON types differ)."""
    return (type(rid).__name__, rid)


def _short(data: bytes | Line, limit: int = 300) -> str:
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else repr(data)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} chars)"


class WorkerChild:
    """``python -m bridge`` in a working directory of our choosing, stdout read on a thread."""

    def __init__(self, args: Sequence[str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=worker_env({"PYTHONPATH": str(ROOT)}),
            cwd=cwd,
        )
        self.lines: queue.Queue[bytes | None] = queue.Queue()
        self.stderr = bytearray()
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw)
        self.lines.put(None)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        while chunk := os.read(fd, 65536):
            self.stderr += chunk
            del self.stderr[: max(0, len(self.stderr) - 65536)]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.write(b'{"cmd":"quit"}\n')
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for t in self._threads:
            t.join(5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None and not stream.closed:
                with contextlib.suppress(OSError):
                    stream.close()

    @property
    def stderr_tail(self) -> str:
        return self.stderr.decode("utf-8", "replace")[-2000:]


class FuzzWorker:
    """A real worker with the tiny model, fed batches of lines; see the module docstring.

    ``workdir`` is the worker's working directory (relative paths in
    requests land there). A worker that died is replaced before the next
    batch (and the death reported as a violation of the batch that caused it).
    """

    def __init__(
        self,
        model: Path,
        workdir: Path,
        *,
        max_line_bytes: int = MAX_LINE_BYTES,
        settle_s: float = 20.0,
    ) -> None:
        self.model = model
        self.workdir = workdir
        self.max_line_bytes = max_line_bytes
        self.settle_s = settle_s
        self.stats = Stats()
        self._child: WorkerChild | None = None
        self._serial = 0
        self.replies: list[Line] = []  # every line the last exchange read

    # -- life ----------------------------------------------------------------------

    @property
    def child(self) -> WorkerChild:
        if self._child is None or not self._child.alive():
            if self._child is not None:
                self._child.close()
                self.stats.restarts += 1
            self._child = WorkerChild(["--max-line-bytes", str(self.max_line_bytes)], self.workdir)
            self._load()
        return self._child

    def _load(self) -> None:
        reply = self._call({"cmd": "load", "id": "fuzz-load", "path": str(self.model)})
        if reply.get("type") != "loaded":
            raise RuntimeError(f"the fuzzed worker could not load the tiny model: {reply}")

    def _call(self, request: Mapping[str, object], timeout: float = 60.0) -> Line:
        """One request whose reply is the next line with its id (between batches only)."""
        child = self._child
        assert child is not None
        child.write(orjson.dumps(request) + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            raw = child.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            if raw is None:
                raise RuntimeError(f"the fuzzed worker died; stderr:\n{child.stderr_tail}")
            line = orjson.loads(raw)
            if line.get("id") == request["id"] and line.get("type") != "token":
                return line  # type: ignore[no-any-return]

    @property
    def rss_bytes(self) -> int:
        return int(psutil.Process(self.child.pid).memory_info().rss)

    def close(self) -> None:
        if self._child is not None:
            self._child.close()
            self._child = None

    def __enter__(self) -> FuzzWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def next_serial(self) -> int:
        self._serial += 1
        return self._serial

    # -- one batch -----------------------------------------------------------------

    def exchange(
        self,
        items: Sequence[bytes | float],
        *,
        refusals: Mapping[object, str] | None = None,
        settle_s: float | None = None,
        bounded: bool = False,
    ) -> list[str]:
        """Send the lines (each ending in ``\\n``; a float is a pause of that many
        seconds), read the answers, return the violations.

        ``refusals`` maps a request id to the field path its request must be
        refused for: an ``invalid_request`` whose message names that field.
        Requests still running ``settle_s`` after the last line are cancelled
        (a huge ``max_tokens`` is not a fault); their terminal lines must
        then come within ``CANCEL_GRACE_S``. With ``bounded`` (every request
        in the batch is short by construction) needing that cancel is itself
        a violation.
        """
        child = self.child
        lines = [item for item in items if isinstance(item, bytes)]
        self.replies = []
        violations: list[str] = []
        expected: dict[tuple[str, object] | None, _Expected] = {}
        changes_model = False
        kinds: Counter[Kind] = Counter()
        for line in lines:
            sent = classify(line, self.max_line_bytes)
            if sent.kind is Kind.QUIT:
                raise ValueError(f"exchange() does not send quit: {line!r}")
            kinds[sent.kind] += 1
            if sent.kind in (Kind.BLANK, Kind.CANCEL):
                continue
            key = _key(sent.id) if sent.kind is Kind.ADDRESSED else None
            expected.setdefault(key, _Expected()).sent.append((sent, line))
            changes_model |= isinstance(sent.cmd, str) and sent.cmd in MODEL_CHANGING
        self.stats.lines += len(lines)
        self.stats.requests += kinds[Kind.LEGACY] + kinds[Kind.ADDRESSED] + kinds[Kind.CANCEL]
        self.stats.examples += 1
        # A sentinel request after the batch. The worker batches: the
        # sentinel's reply may come before generations of the batch end, so the
        # batch is over once the sentinel and every request have their
        # terminal line; then a barrier request, whose reply comes after any
        # line the worker still wrote for the batch (checked like the others).
        self._serial += 1
        sentinel = f"fuzz-sentinel-{self._serial}"
        try:
            chunk: list[bytes] = []
            for item in items:
                if isinstance(item, bytes):
                    chunk.append(item)
                    continue
                child.write(b"".join(chunk))
                chunk = []
                time.sleep(item)
            chunk.append(orjson.dumps({"cmd": "tokenize", "id": sentinel, "text": "x"}) + b"\n")
            child.write(b"".join(chunk))
        except OSError as exc:
            violations.append(f"died: writing the batch failed ({exc})")
        settle = self.settle_s if settle_s is None else settle_s
        cleanup_sent = False
        deadline = time.monotonic() + settle
        died = False
        sentinel_done = barrier = False
        while True:
            if sentinel_done and not barrier and not any(e.missing for e in expected.values()):
                barrier = True  # every request ended: now the barrier
                self._serial += 1
                sentinel = f"fuzz-barrier-{self._serial}"
                sentinel_done = False
                try:
                    child.write(
                        orjson.dumps({"cmd": "tokenize", "id": sentinel, "text": "x"}) + b"\n"
                    )
                except OSError:
                    died = True
                    break
                deadline = time.monotonic() + CANCEL_GRACE_S
            if barrier and sentinel_done:
                break
            try:
                if time.monotonic() > deadline:
                    raise queue.Empty  # also while a stream keeps the worker busy
                raw = child.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                if cleanup_sent or barrier:
                    if not sentinel_done:
                        what = "barrier" if barrier else "sentinel"
                        violations.append(
                            f"lost: the {what} request after the batch was never answered"
                        )
                    break
                # Cancel what still runs (a huge max_tokens, a long prefill).
                if bounded:
                    running = [
                        _short(line, 150)
                        for slot in expected.values()
                        if slot.missing
                        for _, line in slot.sent
                    ]
                    violations.append(
                        f"unbounded: still running {settle:g} s after the batch, then cancelled: "
                        f"{running}"
                    )
                child.write(b'{"cmd":"cancel"}\n')
                cleanup_sent = True
                deadline = time.monotonic() + CANCEL_GRACE_S
                continue
            if raw is None:
                died = True
                break
            if raw.startswith(b'{"type":') and f'"id":"{sentinel}"'.encode() in raw[:200]:
                if cleanup_sent and b'"code":"cancelled"' in raw:
                    # The clean-up cancel caught the sentinel in the queue: ask again.
                    self._serial += 1
                    sentinel = f"fuzz-sentinel-{self._serial}"
                    child.write(
                        orjson.dumps({"cmd": "tokenize", "id": sentinel, "text": "x"}) + b"\n"
                    )
                    continue
                sentinel_done = True
                continue
            self._take(raw, expected, violations)
        missing = sum(e.missing for e in expected.values())
        if died or not child.alive():
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(5)
            violations.append(
                f"died: exit status {child.proc.returncode}; stderr tail:\n{child.stderr_tail}"
            )
        elif missing > 0:
            lost = [
                _short(line, 300)
                for slot in expected.values()
                if slot.missing
                for _, line in slot.sent
            ]
            violations.append(f"lost: {missing} terminal line(s) never came: {lost}")
        violations += self._check(expected, refusals or {})
        if changes_model and self._child is not None and self._child.alive():
            self._load()
        for v in violations:
            self.stats.violations[v.split(":", 1)[0]] += 1
        return violations

    def _take(
        self,
        raw: bytes,
        expected: dict[tuple[str, object] | None, _Expected],
        violations: list[str],
    ) -> int:
        """Account for one output line; returns 1 if it was an expected terminal line."""
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            violations.append(f"not-json: stdout carried {_short(raw)}")
            return 0
        try:
            validate_reply(line)
        except AssertionError as exc:
            violations.append(f"schema: {_short(str(exc).encode())}")
        if not isinstance(line, dict):
            return 0
        self.replies.append(line)
        kind = line.get("type")
        if kind == "error":
            self.stats.codes[str(line.get("code"))] += 1
            if line.get("code") == "internal":
                self.stats.internal_messages[str(line.get("error"))[:100]] += 1
        key = _key(line["id"]) if "id" in line else None
        slot = expected.get(key)
        if slot is None:
            violations.append(
                f"misrouted: a line for a request that was never sent: {_short(line)}"
            )
            return 0
        if kind == "token":
            self.stats.token_lines += 1
            if not slot.streams:
                violations.append(
                    f"misrouted: a token line for a request that does not stream: {_short(line)}"
                )
            elif slot.count == 1 and slot.terminals:
                slot.tokens_after_end += 1
            return 0
        if kind == "progress":  # an event line, not terminal
            if not slot.may_progress:
                violations.append(
                    "misrouted: a progress line for a request that did not ask for progress: "
                    f"{_short(line)} (sent: {[_short(s[1], 150) for s in slot.sent]})"
                )
            elif slot.count == 1 and slot.terminals:
                slot.progress_after_end += 1
            return 0
        self.stats.terminal_lines += 1
        slot.terminals.append(line)
        if len(slot.terminals) > slot.count:
            violations.append(
                f"extra: more terminal lines than requests for id {line.get('id', '(none)')!r}: "
                f"{[_short(s[1]) for s in slot.sent]} got {[_short(t) for t in slot.terminals]}"
            )
            return 0
        return 1

    def _check(
        self,
        expected: dict[tuple[str, object] | None, _Expected],
        refusals: Mapping[object, str],
    ) -> list[str]:
        out: list[str] = []
        idless = expected.get(None)
        if idless is not None:
            want = Counter(
                {
                    "line_too_long": sum(s.kind is Kind.OVERSIZED for s, _ in idless.sent),
                    "invalid_json": sum(s.kind is Kind.NOT_JSON for s, _ in idless.sent),
                }
            )
            got = Counter(str(t.get("code")) for t in idless.terminals if t.get("type") == "error")
            for code, n in want.items():
                if got[code] != n:
                    lines = [
                        _short(line, 120) for s, line in idless.sent if s.kind is not Kind.LEGACY
                    ]
                    out.append(
                        f"count: id-less {code} errors: expected {n}, got {got[code]} "
                        f"(lines: {lines}; replies: {[_short(t, 200) for t in idless.terminals]})"
                    )
        for key, slot in expected.items():
            for t in slot.terminals:
                if t.get("type") not in slot.allowed:
                    out.append(
                        f"wrong-reply: a {t.get('type')!r} reply to {[_short(s[1]) for s in slot.sent]}: {_short(t)}"
                    )
                if t.get("code") == "internal":
                    out.append(f"internal: {_short(t)} for {[_short(s[1]) for s in slot.sent]}")
            if slot.tokens_after_end:
                out.append(
                    f"extra: {slot.tokens_after_end} token line(s) after the terminal line for id {key}"
                )
            if slot.progress_after_end:
                out.append(
                    f"extra: {slot.progress_after_end} progress line(s) after the terminal line "
                    f"for id {key}"
                )
            if key is None:
                continue
            path = refusals.get(key[1])
            if path is not None and slot.count == 1 and slot.terminals:
                t = slot.terminals[0]
                message = str(t.get("error", ""))
                named = message.startswith(path) and message[len(path) : len(path) + 1] in (
                    ":",
                    ".",
                    "[",
                )
                if t.get("code") != "invalid_request" or not named:
                    out.append(
                        f"accepted: must be refused as invalid_request naming {path!r}: "
                        f"{_short(slot.sent[0][1])} got {_short(t)}"
                    )
        return out


def raise_violations(violations: Sequence[str]) -> None:
    if violations:
        raise AssertionError("\n".join(f"- {v}" for v in violations))


@contextlib.contextmanager
def fuzz_worker(model: Path, workdir: Path, **options: Any) -> Iterator[FuzzWorker]:
    worker = FuzzWorker(model, workdir, **options)
    try:
        yield worker
    finally:
        worker.close()
