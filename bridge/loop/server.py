"""The worker's life: claim stdout, read stdin, route, and exit cleanly.

``serve`` is shared by ``python -m bridge`` (the mlx-lm engine) and
``python -m mock_worker`` (a scripted engine): one request loop, two engines.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, NoReturn

from bridge.engines.engine_protocol import DEFAULT_MAX_CONCURRENCY, Engine
from bridge.loop.jobs import Job
from bridge.loop.router import Router
from bridge.loop.scheduler import BatchScheduler
from bridge.loop.scheduling import Scheduler
from bridge.loop.signals import StopSignals
from bridge.loop.stdio import LineWriter, claim_stdout, read_lines
from bridge.versions import package_versions
from protocol.codec import DEFAULT_MAX_LINE_BYTES, PROTOCOL_VERSION
from protocol.errors import RequestId, WireError
from protocol.replies import Bye, ErrorReply, HelloReply, Reply
from protocol.requests import COMMANDS, MAX_LOGPROBS, SAMPLING_OPTIONS, Load, Quit

log = logging.getLogger("bridge")

# How long quit / end of stdin waits for the engine thread before exiting
# anyway. A decode step or a prefill chunk ends well within it; a model load
# may not, and is abandoned.
EXIT_GRACE_S = 0.8
GIL_SWITCH_S = 0.001


@dataclass(frozen=True, slots=True, kw_only=True)
class ServeOptions:
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    max_queue: int = 256
    # Refuse unknown request fields (invalid_request) instead of logging them.
    strict: bool = False
    preload: str | None = None
    max_prompt_tokens: int | None = None  # reported in hello's limits when set
    # Sequences decoded together (--max-concurrency); reported in hello.
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    prefill_chunk_tokens: int | None = None  # reported in hello's limits when set
    # hello's commands: what this worker serves (a sharded one leaves out inspect)
    commands: tuple[str, ...] = COMMANDS
    versions: tuple[str, ...] = ("mlx", "mlx-lm")
    # Reported only when installed: their absence tells the host something.
    optional_versions: tuple[str, ...] = ("mlx-vlm",)


def serve(
    engine: Engine,
    options: ServeOptions,
    *,
    stdin: BinaryIO | None = None,
    protocol_fd: int | None = None,
    on_writer: Callable[[Callable[[bytes], None]], None] | None = None,
    on_quit: Callable[[Quit | None], None] | None = None,
    on_fatal: Callable[[Callable[[WireError], NoReturn]], None] | None = None,
) -> int:
    """Serve the protocol until ``quit`` or end of stdin; returns the exit code.

    Two hooks exist for :mod:`mock_worker`'s fault injection; the worker
    passes neither. ``on_writer`` is called once, before the first request is
    read, with a function that writes raw bytes to the protocol output
    through the one locked writer. ``on_quit`` is called on the stdin thread
    when the loop ends by ``quit`` (with that request) or by end of stdin
    (with None), before anything is cancelled; it may exit the process or
    block.

    ``on_fatal``, when given, is called once before the first request is
    read with a function that ends every request with an error and exits
    the process (status 1), from any thread: for a failure the worker
    cannot serve on after (a sharded worker's dead rank).
    """
    if protocol_fd is None:
        protocol_fd = claim_stdout()
    # The stdin thread needs the GIL to read a cancel while the engine thread
    # steps the batch in Python: hand it over within 1 ms, not CPython's 5 ms.
    sys.setswitchinterval(GIL_SWITCH_S)
    stdin = stdin if stdin is not None else sys.stdin.buffer
    schedulers: list[Scheduler] = []
    writer = LineWriter(protocol_fd, on_broken=lambda: _exit_soon(schedulers[0]))
    scheduler = BatchScheduler(
        engine,
        max_queue=options.max_queue,
        max_concurrency=options.max_concurrency,
        write=writer.write,
    )
    schedulers.append(scheduler)
    if on_writer is not None:
        on_writer(writer.write)
    if on_fatal is not None:
        on_fatal(lambda error: _fail_and_exit(scheduler, error))
    versions: dict[str, str] = {}
    limits = {
        "max_line_bytes": options.max_line_bytes,
        "max_queue": options.max_queue,
        "max_logprobs": MAX_LOGPROBS,
        "max_concurrency": options.max_concurrency,
    }
    if options.prefill_chunk_tokens:
        limits["prefill_chunk_tokens"] = options.prefill_chunk_tokens
    if options.max_prompt_tokens:
        limits["max_prompt_tokens"] = options.max_prompt_tokens

    def hello(request_id: RequestId | None) -> HelloReply:
        if not versions:
            versions.update(package_versions(options.versions, options.optional_versions))
        facts = engine.facts()
        return HelloReply(
            id=request_id,
            protocol_version=PROTOCOL_VERSION,
            versions=versions,
            commands=options.commands,
            sampling_options=SAMPLING_OPTIONS,
            limits=limits,
            pid=os.getpid(),
            model=facts.path if facts else None,
        )

    signals = StopSignals(stdin)
    signals.install()
    router = Router(
        engine=engine,
        scheduler=scheduler,
        writer=writer,
        hello=hello,
        max_line_bytes=options.max_line_bytes,
        strict=options.strict,
    )
    with signals.blocked():  # the engine thread and its children never take them
        scheduler.start()
    if options.preload:
        scheduler.submit(Job(request=Load(path=options.preload), send=_log_preload))
    quit_request = None
    try:
        for line in read_lines(stdin, options.max_line_bytes):
            try:
                quit_request = router.dispatch(line)
            except Exception:  # dispatch answers its own failures; this is the last guard
                log.exception("request line dropped")
            scheduler.release_warm_up()
            if quit_request is not None or writer.broken:
                break
        signals.stopping()
        if signals.received:
            log.info("%s: shutting down as on quit", signals.name)
        if on_quit is not None and not writer.broken:
            on_quit(quit_request)
    except KeyboardInterrupt:
        log.info("interrupted; shutting down")
    signals.stopping()
    clean = scheduler.shutdown(EXIT_GRACE_S)
    if quit_request is not None and quit_request.id is not None:
        writer.send(Bye(id=quit_request.id))
    if not clean:
        log.warning("engine thread still busy after %.1fs; exiting without it", EXIT_GRACE_S)
        _hard_exit(0)
    return 0


def _log_preload(reply: Reply) -> None:
    if isinstance(reply, ErrorReply):
        log.error("--model: %s (%s)", reply.message, reply.code)
    else:
        log.info("--model: %s", reply.to_wire())


def _exit_soon(scheduler: Scheduler) -> None:
    """Nobody reads our output any more: stop work and leave."""

    def leave() -> None:
        scheduler.shutdown(EXIT_GRACE_S)
        _hard_exit(0)

    threading.Thread(target=leave, name="bridge-exit", daemon=True).start()


def _fail_and_exit(scheduler: Scheduler, error: WireError) -> NoReturn:
    log.error("%s: ending every request and exiting", error.message)
    scheduler.fail_all(error)
    _hard_exit(1)


def _hard_exit(code: int) -> NoReturn:
    logging.shutdown()
    os._exit(code)
