"""The engine thread: admit what fits, step every running sequence once, route, release.

``BatchScheduler`` owns the one thread that touches MLX (MLX streams are
thread-local). Its loop, after mlx-lm's ``ResponseGenerator`` and vLLM's
scheduler:

1. **take** queued requests in arrival order: a generation is prepared
   (templated, tokenized) and admitted into the engine's decoder when the
   batch has room (``--max-concurrency``, the decoder's capacity, and the KV
   bytes of :mod:`bridge.loop.admission`); otherwise it waits at the head of
   the queue, and everything behind it waits too. ``tokenize``,
   ``detokenize``, ``info`` and ``inspect`` run at their turn, between two
   steps. ``load`` and ``unload`` wait until the batch has drained, and so
   does everything behind them. A request without an id (the legacy
   dialect) runs alone;
2. **step** the decoder once: one decode step for every decoding sequence
   and at most one prefill chunk; each event goes to its request's
   :class:`~bridge.loop.generation.Generation`, and the step's token lines
   are written with one call;
3. **release** what ended: finished sequences, stop strings, and cancels
   (a cancel is heard within one step, in any phase).

The stdin thread only submits and cancels; everything else happens here.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

from bridge.engines.engine_protocol import (
    DEFAULT_MAX_CONCURRENCY,
    Decoded,
    Decoder,
    Engine,
    Failed,
    LoadStep,
    Prefilled,
    Prepared,
    ReportLoad,
    SeqId,
)
from bridge.loop.admission import Verdict, admit, kv_bytes
from bridge.loop.generation import Generation, LineBatch
from bridge.loop.jobs import Job
from protocol.errors import (
    Busy,
    DuplicateId,
    Internal,
    NoModel,
    OutOfMemory,
    RequestId,
    ShuttingDown,
    WireError,
)
from protocol.replies import (
    BatchStats,
    InfoReply,
    Inspected,
    Loaded,
    ProgressEvent,
    TextReply,
    TokensReply,
    Unloaded,
)
from protocol.requests import Chat, Detokenize, Generate, Info, Inspect, Load, Tokenize, Unload

log = logging.getLogger("bridge.scheduler")

# The engine thread imports MLX before its first job, so that the first load
# does not pay for it. Importing mlx.core holds the GIL for its whole
# initialisation (0.3-0.5 s with the CUDA build), which would delay the
# answer to the host's first line, usually ``hello``. So the import waits
# until the first line has been answered, or until the host has been silent
# this long.
WARM_UP_IDLE_S = 0.5

# ``info`` reports no decode rate once the batch has not stepped for this long.
IDLE_RATE_S = 1.0


def info_reply(engine: Engine, request: Info, batch: BatchStats | None = None) -> InfoReply:
    facts = engine.facts()
    if facts is None:
        raise NoModel("info: no model loaded", request_id=request.id)
    return InfoReply(id=request.id, model=facts, memory=engine.memory(), batch=batch)


@dataclass(slots=True)
class _Running:
    generation: Generation
    rows: int  # the most tokens its KV cache will hold: prompt + max_tokens


class BatchScheduler:
    def __init__(
        self,
        engine: Engine,
        *,
        max_queue: int = 256,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        write: Callable[[bytes], None] | None = None,
    ) -> None:
        self._engine = engine
        self._max_queue = max_queue
        self._max_concurrency = max(1, max_concurrency)
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._by_id: dict[RequestId, Job] = {}
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="bridge-engine", daemon=True)
        self._warm_go = threading.Event()
        # Changed on the engine thread only; ``_running`` and ``_head`` under
        # ``_cond``, since the stdin thread reads them (the stats are snapshots).
        self._lines = LineBatch(write) if write is not None else None
        self._decoder: Decoder | None = None
        self._running: dict[SeqId, _Running] = {}
        self._head: tuple[Job, Prepared] | None = None  # prepared, waiting for room
        self._current: Job | None = None  # a non-generation job being run
        self._exclusive = False  # a legacy (id-less) generation is running
        self._seq_ids = itertools.count()
        self._steps = 0
        self._last_step_ms = 0.0
        self._last_step_at = 0.0
        self._rate = _Rate()
        self._stats = self._snapshot()

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def release_warm_up(self) -> None:
        """Let the engine thread import MLX now (see ``WARM_UP_IDLE_S``)."""
        self._warm_go.set()

    def shutdown(self, timeout: float) -> bool:
        """Cancel everything, stop the thread; True if it ended within ``timeout``.

        Requests still unfinished after the timeout (a model load cannot be
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
        if alive:
            with self._cond:
                left = [r.generation.job for r in list(self._running.values())]
                if self._head is not None:
                    left.append(self._head[0])
                if self._current is not None:
                    left.append(self._current)
            for job in left:
                job.fail(ShuttingDown("worker is exiting; this request was cut off"))
        return not alive

    # -- the stdin thread ----------------------------------------------------------

    def submit(self, job: Job) -> None:
        rid = job.request.id
        with self._cond:
            if self._closing:
                raise ShuttingDown("worker is shutting down", request_id=rid)
            if rid is not None and rid in self._by_id:
                raise DuplicateId(f"id: {rid!r} is already in flight", request_id=rid)
            if len(self._queue) + (self._head is not None) >= self._max_queue:
                raise Busy(
                    f"queue is full ({self._max_queue} requests waiting; --max-queue)",
                    request_id=rid,
                )
            if rid is not None:
                self._by_id[rid] = job
                job.on_finish = self._forget
            self._queue.append(job)
            self._cond.notify()

    def cancel(self, request_id: RequestId | None, *, reason: str = "cancelled") -> None:
        """Cancel one request by id, or all of them. Unknown ids are ignored:
        the request may have just finished, and ``cancel`` never replies.
        A queued request ends here; a running one within the engine's next step."""
        with self._cond:
            if request_id is None:
                queued = list(self._queue)
                self._queue.clear()
                others = [*self._by_id.values(), *self._unaddressed()]
            else:
                job = self._by_id.get(request_id)
                queued = [job] if job is not None and job in self._queue else []
                for j in queued:
                    self._queue.remove(j)
                others = [job] if job is not None and not queued else []
            self._cond.notify()
        for job in [*queued, *others]:
            job.cancel()
        for job in queued:
            job.finish_cancelled(reason)

    def fail_all(self, error: WireError) -> None:
        """End every queued and running request with ``error``, from any thread,
        without waiting for the engine thread (which may never return: a
        sharded worker's collective with a dead rank). Nothing is admitted after."""
        with self._cond:
            self._closing = True
            jobs = [*self._queue, *self._by_id.values(), *self._unaddressed()]
            self._queue.clear()
            self._cond.notify_all()
        for job in dict.fromkeys(jobs):
            job.fail(error)

    def model_change_pending(self) -> bool:
        """True while a queued or running ``load``/``unload`` may change the model."""
        with self._cond:
            jobs = [*self._queue, *([self._current] if self._current else [])]
        return any(isinstance(j.request, Load | Unload) for j in jobs)

    def stats(self) -> BatchStats:
        """The batch as of the last step (any thread); an idle batch decodes 0 tokens/s."""
        stats = self._stats
        with self._cond:
            queued = len(self._queue) + (1 if self._head is not None else 0)
        idle = time.perf_counter() - self._last_step_at > IDLE_RATE_S
        return replace(stats, queued=queued, tokens_per_s=0.0 if idle else stats.tokens_per_s)

    # -- the engine thread ---------------------------------------------------------

    def _unaddressed(self) -> list[Job]:
        """Jobs in flight without an id (the legacy dialect; caller holds the lock)."""
        out = [
            r.generation.job for r in self._running.values() if r.generation.job.request.id is None
        ]
        if self._head is not None and self._head[0].request.id is None:
            out.append(self._head[0])
        if self._current is not None and self._current.request.id is None:
            out.append(self._current)
        return out

    def _forget(self, job: Job) -> None:
        rid = job.request.id
        with self._cond:
            if rid is not None and self._by_id.get(rid) is job:
                del self._by_id[rid]

    def _run(self) -> None:
        self._warm_go.wait(WARM_UP_IDLE_S)
        try:
            if not self._closing:
                self._engine.warm_up()
        except Exception:
            log.exception("engine warm-up failed")
        try:
            while self._wait_for_work():
                self._take()
                if self._running:
                    self._step()
                    # Hand the GIL over for a moment: a stdin thread holding a
                    # cancel line gets to read it before the cancels are looked at.
                    time.sleep(0)
                self._release_cancelled()
        finally:
            for seq in list(self._running):
                self._end(seq, "cancelled")
            with self._cond:
                head, self._head = self._head, None
            if head is not None:
                head[0].finish_cancelled("worker shutting down")
            self._close_decoder()
            self._engine.close()

    def _wait_for_work(self) -> bool:
        with self._cond:
            while not self._queue and not self._running and self._head is None:
                if self._closing:
                    return False
                self._cond.wait()
            return True

    def _take(self) -> None:
        """Run or admit queued requests until one has to wait."""
        while True:
            if self._head is not None:
                job, prepared = self._head
                if job.cancelled:
                    with self._cond:
                        self._head = None
                    job.finish_cancelled()
                    continue
                if not self._admit(job, prepared):
                    return
                with self._cond:
                    self._head = None
                continue
            with self._cond:
                if not self._queue:
                    return
                job = self._queue[0]
                request = job.request
                model_change = isinstance(request, Load | Unload)
                generation = isinstance(request, Generate | Chat)
                if (model_change or (generation and request.id is None)) and self._running:
                    return  # waits for the batch to drain
                if generation and self._exclusive:
                    return
                self._queue.popleft()
                if not generation:
                    self._current = job
            if generation:
                ready = self._prepare(job)
                if ready is not None and not self._admit(job, ready):
                    with self._cond:
                        self._head = (job, ready)
                    return
            else:
                if model_change:
                    self._close_decoder()  # it holds the old model
                try:
                    self._execute(job)
                finally:
                    with self._cond:
                        self._current = None

    def _prepare(self, job: Job) -> Prepared | None:
        if job.cancelled:
            job.finish_cancelled()
            return None
        request = job.request
        assert isinstance(request, Generate | Chat)
        try:
            return self._engine.prepare(request)
        except WireError as exc:
            job.fail(exc)
        except Exception as exc:
            log.exception("request %r failed", request.id)
            job.fail(Internal(f"{type(exc).__name__}: {exc}"))
        return None

    def _admit(self, job: Job, prepared: Prepared) -> bool:
        """Start ``job`` in the decoder if it fits; False when it has to wait."""
        decoder = self._decoder_now()
        rows = len(prepared.tokens) + prepared.sampling.max_tokens
        capacity = min(self._max_concurrency, decoder.capacity)
        verdict = admit(
            [r.rows for r in self._running.values()], rows, capacity=capacity, kv=decoder.kv
        )
        if verdict is Verdict.WAIT:
            return False
        request = job.request
        if verdict is Verdict.NEVER:
            need = kv_bytes((rows,), decoder.kv)
            job.fail(
                OutOfMemory(
                    f"the KV cache of {len(prepared.tokens)} prompt tokens + max_tokens "
                    f"{prepared.sampling.max_tokens} needs {need} bytes, over the KV budget of "
                    f"{decoder.kv.budget} bytes (lower max_tokens or the prompt, or raise "
                    "--memory-budget)",
                    request_id=request.id,
                )
            )
            return True
        now = time.perf_counter()
        job.started_at = now
        generation = Generation(
            job, prepared, parser=prepared.answer_parser, lines=self._lines, admitted_at=now
        )
        seq = next(self._seq_ids)
        try:
            generation.cached_tokens = decoder.add(seq, prepared, should_abort=job.cancel_check)
        except WireError as exc:
            job.fail(exc)
            return True
        except Exception as exc:  # the decoder may be half-way through a change: drop it
            log.exception("request %r could not start", request.id)
            error = Internal(f"{type(exc).__name__}: {exc}")
            job.fail(error)
            self._fail_running(decoder, error)
            return True
        with self._cond:  # the stdin thread reads it (cancel all, shutdown)
            self._running[seq] = _Running(generation=generation, rows=rows)
        self._exclusive = request.id is None
        self._stats = self._snapshot()
        return True

    def _decoder_now(self) -> Decoder:
        if self._decoder is None:
            self._decoder = self._engine.decoder()
        return self._decoder

    def _close_decoder(self) -> None:
        """Forget the decoder (the model changed); only when nothing runs."""
        if self._decoder is not None and not self._running:
            self._decoder.close()
            self._decoder = None

    def _step(self) -> None:
        decoder = self._decoder
        assert decoder is not None
        started = time.perf_counter()
        try:
            events = decoder.step()
        except Exception as exc:  # an engine failure: every running sequence ends with it
            log.exception("decode step failed")
            self._fail_running(
                decoder, Internal(f"decode step failed: {type(exc).__name__}: {exc}")
            )
            return
        running = self._running
        tokens = 0
        for event in events:
            r = running.get(event.seq)
            if r is None:
                continue
            if isinstance(event, Decoded):
                tokens += 1
                reason = r.generation.step(event.step)
                if reason is not None:
                    self._end(event.seq, reason, engine_done=event.step.finish_reason is not None)
            elif isinstance(event, Prefilled):
                r.generation.prefilled(event.done, event.total)
            elif isinstance(event, Failed):
                self._end(event.seq, "failed", engine_done=True, error=event.error)
        if self._lines is not None:
            self._lines.flush()
        self._steps += 1
        self._last_step_at = time.perf_counter()
        elapsed = self._last_step_at - started
        self._last_step_ms = elapsed * 1000.0
        self._rate.add(tokens, elapsed)
        self._stats = self._snapshot()

    def _fail_running(self, decoder: Decoder, error: WireError) -> None:
        """End every running sequence with ``error`` and drop the decoder, whose
        state can no longer be trusted; the next admission gets a fresh one."""
        with self._cond:
            failed = list(self._running.values())
            self._running.clear()
        for r in failed:
            r.generation.job.fail(error)
        self._exclusive = False
        self._decoder = None
        try:
            decoder.close()
        except Exception:
            log.exception("decoder close failed")
        self._stats = self._snapshot()

    def _release_cancelled(self) -> None:
        for seq, r in list(self._running.items()):
            if r.generation.cancelled:
                self._end(seq, "cancelled")

    def _end(
        self,
        seq: SeqId,
        reason: str,
        *,
        engine_done: bool = False,
        error: WireError | None = None,
    ) -> None:
        """Take the sequence out of the decoder, then write the request's
        ``done`` (or ``error``: the sequence failed on its own).

        In that order, so that ``done`` means the sequence is gone: an engine
        that cannot let it go (mock_worker's ``ignore_cancel``) never writes
        it. Writing ``done`` first saved nothing measurable on the H200
        (docs/benchmarks.md, cancel)."""
        with self._cond:
            r = self._running.pop(seq, None)
        if r is None:
            return
        decoder = self._decoder
        if not engine_done and decoder is not None:
            try:
                decoder.remove(seq)
            except Exception:
                log.exception("removing sequence %d failed", seq)
        if self._lines is not None:
            self._lines.flush()  # the other requests' tokens of this step go first
        if error is not None:
            r.generation.job.fail(error)
        else:
            peak = decoder.peak_memory() if decoder is not None else 0
            r.generation.finish(reason, peak_memory=peak)
        if not self._running:
            self._exclusive = False
        self._stats = self._snapshot()  # info between two steps sees it gone

    def _execute(self, job: Job) -> None:
        if job.cancelled:
            job.finish_cancelled()
            return
        request = job.request
        job.started_at = time.perf_counter()
        try:
            match request:
                case Load():
                    facts = self._engine.load(request, _load_reporter(job))
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
                    job.finish(info_reply(self._engine, request, self.stats()))
        except WireError as exc:
            job.fail(exc)
        except Exception as exc:  # a bug or an engine failure: report it, keep serving
            log.exception("request %r failed", request.id)
            job.fail(Internal(f"{type(exc).__name__}: {exc}"))
        finally:
            if not job.finished:
                job.fail(Internal("request ended without a reply"))

    def _snapshot(self) -> BatchStats:
        running = self._running
        decoder = self._decoder
        kv = decoder.kv if decoder is not None else None
        return BatchStats(
            running=sum(1 for r in running.values() if r.generation.started),
            prefilling=sum(1 for r in running.values() if not r.generation.started),
            queued=0,
            max_concurrency=self._max_concurrency,
            kv_reserved_bytes=kv_bytes([r.rows for r in running.values()], kv) if kv else 0,
            kv_budget_bytes=kv.budget if kv else None,
            steps=self._steps,
            last_step_ms=self._last_step_ms,
            tokens_per_s=self._rate.per_second(),
        )


class _Rate:
    """Tokens per second over the last steps (about one second's worth)."""

    __slots__ = ("_tokens", "_seconds")

    def __init__(self) -> None:
        self._tokens = 0.0
        self._seconds = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        if self._seconds > 1.0:  # decay: keep the last second or so
            self._tokens *= 0.5
            self._seconds *= 0.5
        self._tokens += tokens
        self._seconds += seconds

    def per_second(self) -> float:
        return self._tokens / self._seconds if self._seconds > 0 else 0.0


def _load_reporter(job: Job) -> ReportLoad | None:
    """``progress`` events for a ``load`` that asked for them."""
    request = job.request
    if not isinstance(request, Load) or not request.progress or request.id is None:
        return None
    rid = request.id

    def report(step: LoadStep) -> None:
        job.emit(
            ProgressEvent(
                id=rid,
                stage="load",
                step=step.step,
                done=step.done,
                total=step.total,
                unit=step.unit,
            )
        )

    return report
