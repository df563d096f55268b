"""TextDecoder driven directly, in process, with the tiny fixture model (engine thread: this one)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from bridge.engines.engine_protocol import Decoded, Prefilled
from bridge.engines.text.engine import MlxLmEngine
from protocol.requests import Generate, Load, Sampling

LONG = "import os, sys, json; print(os.path.join('a', 'b')); " * 20


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Iterator[MlxLmEngine]:
    engine = MlxLmEngine(prefill_step_size=64, prompt_cache_entries=0)
    engine.load(Load(path=str(tiny_model)))
    yield engine
    engine.unload()


def _never() -> bool:
    return False


def test_prefill_progress_stays_monotonic_when_a_prefilling_solo_moves_to_the_batch(
    engine: MlxLmEngine,
) -> None:
    decoder = engine.decoder()
    long = engine.prepare(Generate(id="a", prompt=LONG, sampling=Sampling(max_tokens=2)))
    short = engine.prepare(Generate(id="b", prompt="hi", sampling=Sampling(max_tokens=2)))
    decoder.add(0, long, should_abort=_never)
    first = decoder.step()  # one solo prefill chunk
    assert [e for e in first if isinstance(e, Prefilled)]
    decoder.add(1, short, should_abort=_never)  # the solo lane moves to the batch mid-prefill
    events = list(first)
    for _ in range(200):
        if not any(isinstance(e, Decoded) and e.seq == 0 for e in events):
            events.extend(decoder.step())
    decoder.close()
    progress = [(e.done, e.total) for e in events if isinstance(e, Prefilled) and e.seq == 0]
    totals = {total for _, total in progress}
    assert len(totals) == 1, progress  # one total: the prompt tokens to prefill
    dones = [done for done, _ in progress]
    assert dones == sorted(dones), progress
    assert dones[-1] == next(iter(totals)), progress


def test_constrained_rows_read_their_input_tokens_in_one_go(engine: MlxLmEngine) -> None:
    """In the batch, a constrained row takes its input token from the step's
    input array (StepInputs: one read for every row), not from its own
    context; this fails if mlx-lm's GenerationBatch stops exposing it."""
    from bridge.engines.constraints import Compiled, ConstraintProcessor
    from protocol.requests import OutputConstraint

    class Recording:  # the Constraint seam, keeping the processors it makes
        def __init__(self, compiled: Compiled) -> None:
            self.compiled = compiled
            self.made: list[ConstraintProcessor] = []

        def processor(self, prompt_tokens: int) -> ConstraintProcessor:
            made = self.compiled.processor(prompt_tokens)
            self.made.append(made)
            return made

    schema = '{"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}'
    output = OutputConstraint(kind="json_schema", source=schema, field="response_format")
    recording = Recording(engine.compile_constraint(output))
    decoder = engine.decoder()
    for seq in range(2):
        prepared = engine.prepare(
            Generate(id=seq, prompt=f"x{seq}", sampling=Sampling(max_tokens=12))
        )
        decoder.add(
            seq,
            replace(prepared, output=output, constraint=recording),
            should_abort=_never,
        )
    peeked: list[int | None] = []
    for _ in range(6):
        peeked.extend(p.peek() for p in recording.made if p.peek is not None)
        decoder.step()
    decoder.close()
    assert len(recording.made) == 2
    assert any(value is not None for value in peeked), peeked
