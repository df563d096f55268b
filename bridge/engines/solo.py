"""A decoder of one sequence at a time, over an engine's pull generator.

Engines that do not batch (the vision engine) return one of these from
``decoder()``: its capacity is one, so their requests wait their turn in the
scheduler's queue like everyone else's, and the scheduler steps them one
token at a time, between other work.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence

from bridge.engines.engine_protocol import (
    Decoded,
    Event,
    KvShape,
    Prepared,
    SeqId,
    ShouldAbort,
    Step,
)

Generate = Callable[[Prepared, ShouldAbort], tuple[int, Generator[Step, None, None]]]
"""The prompt tokens the prompt cache held, and a generator that yields
steps until finished; it checks ``should_abort`` between prefill chunks and
returns early (without a last step) when it says so; closing it stops decoding."""


class SoloDecoder:
    def __init__(self, generate: Generate, peak_memory: Callable[[], int]) -> None:
        self._generate = generate
        self._peak_memory = peak_memory
        self._seq: SeqId | None = None
        self._steps: Generator[Step, None, None] | None = None

    @property
    def capacity(self) -> int:
        return 1

    @property
    def kv(self) -> KvShape:
        return KvShape()

    def add(self, seq: SeqId, prepared: Prepared, *, should_abort: ShouldAbort) -> int:
        if self._seq is not None:
            raise RuntimeError("a SoloDecoder holds one sequence at a time")
        cached, self._steps = self._generate(prepared, should_abort)
        self._seq = seq
        return cached

    def remove(self, seq: SeqId) -> None:
        if seq == self._seq:
            self.close()

    def step(self) -> Sequence[Event]:
        seq, steps = self._seq, self._steps
        if seq is None or steps is None:
            return ()
        try:
            step = next(steps)
        except StopIteration:  # aborted in prefill: the request was cancelled
            self.close()
            return (Decoded(seq=seq, step=_ABORTED),)
        if step.finish_reason is not None:
            self.close()
        return (Decoded(seq=seq, step=step),)

    def peak_memory(self) -> int:
        return self._peak_memory()

    def close(self) -> None:
        if self._steps is not None:
            self._steps.close()
        self._steps = None
        self._seq = None


# What a generator that stopped without a last step ended with.
_ABORTED = Step(text="", token_id=-1, is_eos=True, finish_reason="cancelled")
