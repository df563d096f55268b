"""The engine thread and its queue.

``SerialScheduler`` owns the one thread that touches MLX (MLX streams are
thread-local): it imports and warms the engine, runs queued jobs one at a
time in arrival order, and closes the engine before the thread ends.

Its public surface (``submit``, ``cancel``, ``shutdown``) is all the request
router uses, so a batching scheduler over mlx-lm's ``BatchGenerator`` can
replace it without touching the protocol layer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from bridge.engines.engine_protocol import Engine
from bridge.loop.generation import run_generation
from bridge.loop.jobs import Job
from protocol.errors import Busy, DuplicateId, Internal, NoModel, RequestId, ShuttingDown, WireError
from protocol.replies import InfoReply, Inspected, Loaded, TextReply, TokensReply, Unloaded
from protocol.requests import Chat, Detokenize, Generate, Info, Inspect, Load, Tokenize, Unload

log = logging.getLogger("bridge.scheduler")

# The engine thread imports MLX before its first job, so that the first load
# does not pay for it. Importing mlx.core holds the GIL for its whole
# initialisation (0.3-0.5 s with the CUDA build), which would delay the
# answer to the host's first line, usually ``hello``. So the import waits
# until the first line has been answered, or until the host has been silent
# this long.
WARM_UP_IDLE_S = 0.5


def info_reply(engine: Engine, request: Info) -> InfoReply:
    facts = engine.facts()
    if facts is None:
        raise NoModel("info: no model loaded", request_id=request.id)
    return InfoReply(id=request.id, model=facts, memory=engine.memory())


class SerialScheduler:
    def __init__(self, engine: Engine, *, max_queue: int = 256) -> None:
        self._engine = engine
        self._max_queue = max_queue
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._running: Job | None = None
        self._by_id: dict[RequestId, Job] = {}
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="bridge-engine", daemon=True)
        self._warm_go = threading.Event()

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def release_warm_up(self) -> None:
        """Let the engine thread import MLX now (see ``WARM_UP_IDLE_S``)."""
        self._warm_go.set()

    def shutdown(self, timeout: float) -> bool:
        """Cancel everything, stop the thread; True if it ended within ``timeout``.

        Jobs still unfinished after the timeout (a model load cannot be
        interrupted) get their terminal line here, so no host waits forever.
        """
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._warm_go.set()
        self.cancel(None, reason="worker shutting down")
        if self._thread.is_alive():
            self._thread.join(timeout)
        alive = self._thread.is_alive()
        with self._cond:
            running = self._running
        if alive and running is not None:
            running.fail(ShuttingDown("worker is exiting; this request was cut off"))
        return not alive

    # -- requests ----------------------------------------------------------------

    def submit(self, job: Job) -> None:
        rid = job.request.id
        with self._cond:
            if self._closing:
                raise ShuttingDown("worker is shutting down", request_id=rid)
            if rid is not None and rid in self._by_id:
                raise DuplicateId(f"id: {rid!r} is already in flight", request_id=rid)
            if len(self._queue) >= self._max_queue:
                raise Busy(f"queue is full ({self._max_queue} requests waiting)", request_id=rid)
            if rid is not None:
                self._by_id[rid] = job
                job.on_finish = self._forget
            self._queue.append(job)
            self._cond.notify()

    def cancel(self, request_id: RequestId | None, *, reason: str = "cancelled") -> None:
        """Cancel one request by id, or all of them. Unknown ids are ignored:
        the request may have just finished, and ``cancel`` never replies."""
        with self._cond:
            if request_id is None:
                targets = list(self._queue)
                if self._running is not None:
                    targets.append(self._running)
            else:
                job = self._by_id.get(request_id)
                targets = [job] if job is not None else []
            queued = [j for j in targets if j is not self._running]
            for job in queued:
                self._queue.remove(job)
        for job in targets:
            job.cancel()
        for job in queued:
            job.finish_cancelled(reason)

    def model_change_pending(self) -> bool:
        """True while a queued or running ``load``/``unload`` may change the model."""
        with self._cond:
            jobs = [*self._queue, *([self._running] if self._running else [])]
        return any(isinstance(j.request, Load | Unload) for j in jobs)

    # -- the engine thread ---------------------------------------------------------

    def _forget(self, job: Job) -> None:
        rid = job.request.id
        with self._cond:
            if rid is not None and self._by_id.get(rid) is job:
                del self._by_id[rid]

    def _next(self) -> Job | None:
        with self._cond:
            while not self._queue and not self._closing:
                self._cond.wait()
            if not self._queue:
                return None
            self._running = self._queue.popleft()
            return self._running

    def _run(self) -> None:
        self._warm_go.wait(WARM_UP_IDLE_S)
        try:
            if not self._closing:
                self._engine.warm_up()
        except Exception:
            log.exception("engine warm-up failed")
        try:
            while (job := self._next()) is not None:
                try:
                    self._execute(job)
                finally:
                    with self._cond:
                        self._running = None
        finally:
            self._engine.close()

    def _execute(self, job: Job) -> None:
        if job.cancelled:
            job.finish_cancelled()
            return
        request = job.request
        job.started_at = time.perf_counter()
        try:
            match request:
                case Generate() | Chat():
                    run_generation(self._engine, job)
                case Load():
                    facts = self._engine.load(request)
                    load_ms = (time.perf_counter() - job.started_at) * 1000
                    job.finish(Loaded(id=request.id, model=facts, load_ms=load_ms))
                case Unload():
                    job.finish(Unloaded(id=request.id, was_loaded=self._engine.unload()))
                case Tokenize():
                    job.finish(TokensReply(id=request.id, tokens=self._engine.tokenize(request)))
                case Detokenize():
                    job.finish(TextReply(id=request.id, text=self._engine.detokenize(request)))
                case Inspect():
                    job.finish(Inspected(id=request.id, attention=self._engine.inspect(request)))
                case Info():
                    job.finish(info_reply(self._engine, request))
        except WireError as exc:
            job.fail(exc)
        except Exception as exc:  # a bug or an engine failure: report it, keep serving
            log.exception("request %r failed", request.id)
            job.fail(Internal(f"{type(exc).__name__}: {exc}"))
        finally:
            if not job.finished:
                job.fail(Internal("request ended without a reply"))
