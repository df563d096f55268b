"""``ScriptedDecoder``: the mock's batch, every running request one scripted token per step.

The scheduler (:mod:`bridge.loop.scheduler`) drives it like the real
engine's decoder, so addressed requests in flight stream together: their
token lines interleave, one per request per step, and a cancel removes one
sequence while the others go on. Its capacity is the worker's
``--max-concurrency`` (1 makes requests run one after another).

A sequence's first step is its prefill: a :class:`Prefilled` event of all its
prompt tokens at once (``progress`` lines for a request that asked), in a
step of its own that the running sequences do not wait in. From the next
step on it decodes with the batch: token ``n`` is word ``n`` of the cycle
(see :mod:`mock_worker.echo`), an EOS step at ``eos_after`` (finish reason
``stop``), and finish reason ``length`` on token ``max_tokens``.

The faults of :mod:`mock_worker.faults` keep their per-request meaning: the
``*_after`` counts are the request's own tokens, checked at the start of the
step that would write its next one. ``token_delay`` is one wait per step,
the longest of the running requests' (a batch moves at the pace of its
slowest member), cut short by a cancel. ``crash_after`` and ``hang_after``
act on the whole process, as a real engine failure would: a hang stalls
every stream.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from bridge.engines.engine_protocol import (
    Decoded,
    Event,
    KvShape,
    Prefilled,
    Prepared,
    SeqId,
    ShouldAbort,
    Step,
)
from protocol.errors import RequestId

from . import echo
from .faults import Faults, block_forever, crash, flood_stderr


@dataclass(frozen=True, slots=True, kw_only=True)
class ScriptedPrepared(Prepared):
    """A prepared generation plus what the script needs to run it."""

    request_id: RequestId | None
    words: tuple[str, ...]
    faults: Faults


@dataclass(slots=True, kw_only=True)
class _Sequence:
    prepared: ScriptedPrepared
    should_abort: ShouldAbort
    cycle: tuple[Step, ...]
    eos_at: int | None
    n: int = 0  # tokens written
    prefilled: bool = False

    @property
    def faults(self) -> Faults:
        return self.prepared.faults

    @property
    def name(self) -> str:
        return f"request {self.prepared.request_id!r}"

    def next_step(self) -> Step:
        """Its next token (or EOS), counted."""
        if self.n == self.eos_at:
            return Step(text="", token_id=echo.EOS_TOKEN_ID, is_eos=True, finish_reason="stop")
        words, n = self.prepared.words, self.n
        step = self.cycle[n % len(self.cycle)] if n else replace(self.cycle[0], text=words[0])
        self.n += 1
        if self.n == self.prepared.sampling.max_tokens:
            step = replace(step, finish_reason="length")
        return step


class ScriptedDecoder:
    """The :class:`bridge.engines.engine_protocol.Decoder` of the scripted engine."""

    def __init__(
        self,
        *,
        capacity: int,
        garbage: Callable[[str], None],
        peak_memory: Callable[[], int],
    ) -> None:
        """``garbage`` writes the garbage line of ``garbage_after`` (it gets the request's name)."""
        self._capacity = max(1, capacity)
        self._garbage = garbage
        self._peak_memory = peak_memory
        self._seqs: dict[SeqId, _Sequence] = {}  # in admission order

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def kv(self) -> KvShape:
        return KvShape()  # no KV cache: admission by count only

    def add(self, seq: SeqId, prepared: Prepared, *, should_abort: ShouldAbort) -> int:
        assert isinstance(prepared, ScriptedPrepared)
        if len(self._seqs) >= self._capacity:
            raise RuntimeError(f"the scripted batch is full ({self._capacity} sequences)")
        faults = prepared.faults
        if faults.stderr_flood:
            flood_stderr(faults.stderr_flood)
        words = prepared.words
        self._seqs[seq] = _Sequence(
            prepared=prepared,
            should_abort=should_abort,
            # Built once per generation, so the mock streams at full speed.
            cycle=echo.token_steps(words, prepared.sampling.logprobs),
            eos_at=0 if not words else faults.eos_after,
        )
        return 0

    def remove(self, seq: SeqId) -> None:
        s = self._seqs.pop(seq, None)
        if s is not None and s.faults.ignore_cancel and s.should_abort():
            block_forever(f"ignore_cancel in {s.name}")

    def step(self) -> Sequence[Event]:
        seqs = self._seqs
        new = [(seq, s) for seq, s in seqs.items() if not s.prefilled]
        if new:  # a prefill step: the running sequences lose no token, only a step
            for _, s in new:
                s.prefilled = True
            return [
                Prefilled(seq=seq, done=len(s.prepared.tokens), total=len(s.prepared.tokens))
                for seq, s in new
            ]
        running = list(seqs.items())
        for _, s in running:  # the faults that act before a request's next token
            faults, n = s.faults, s.n
            if n == faults.garbage_after:
                self._garbage(s.name)
            if n == faults.crash_after:
                crash(faults.exit_code, f"crash_after={n} in {s.name}")
            if n == faults.hang_after:
                block_forever(f"hang_after={n} in {s.name}")
        delay = max((s.faults.token_delay for _, s in running), default=0.0)
        if delay:
            _pause(delay, [s.should_abort for _, s in running])
        events: list[Event] = []
        for seq, s in running:
            if s.should_abort():  # the scheduler removes it after this step
                if s.faults.ignore_cancel:
                    block_forever(f"ignore_cancel in {s.name}")
                continue
            step = s.next_step()
            if step.finish_reason is not None:
                del seqs[seq]
            events.append(Decoded(seq=seq, step=step))
        return events

    def peak_memory(self) -> int:
        return self._peak_memory()

    def close(self) -> None:
        self._seqs.clear()


def _pause(seconds: float, cancelled: Sequence[ShouldAbort]) -> None:
    """Sleep, waking early when one of the requests is cancelled."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0 and not any(c() for c in cancelled):
        time.sleep(min(left, 0.01))
