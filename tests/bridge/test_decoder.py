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


def test_constrained_rows_are_masked_by_the_batch_after_their_first_step(
    engine: MlxLmEngine,
) -> None:
    """In the batch, a constrained row's processor masks its first token and
    hands the row to the batch's mask (BatchMasks), which masks every
    handed-over row in one op; its processor leaves the row's list, so that
    mlx-lm stops splitting the batch into rows. This fails if mlx-lm's
    GenerationBatch stops exposing what BatchMasks finds it by."""
    import json

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

    schema = (
        '{"type": "object", "properties": {"n": {"type": "integer", "maximum": 99}, '
        '"s": {"type": "string", "maxLength": 6}}, "required": ["n", "s"], '
        '"additionalProperties": false}'
    )
    output = OutputConstraint(kind="json_schema", source=schema, field="response_format")
    recording = Recording(engine.compile_constraint(output))
    decoder = engine.decoder()
    for seq in range(3):
        prepared = engine.prepare(
            Generate(id=seq, prompt=f"x{seq}", sampling=Sampling(max_tokens=40))
        )
        if seq < 2:
            prepared = replace(prepared, output=output, constraint=recording)
        decoder.add(seq, prepared, should_abort=_never)
    texts: dict[int, str] = {0: "", 1: "", 2: ""}
    finished: dict[int, str | None] = {}
    handed: set[int] = set()
    left_lists = False
    for _ in range(60):
        for event in decoder.step():
            if isinstance(event, Decoded):
                texts[event.seq] += event.step.text
                if event.step.finish_reason is not None:
                    finished[event.seq] = event.step.finish_reason
        handed |= decoder.batch_masks.handed_over
        # mlx-lm's own batch (private: what BatchMasks relies on) runs no constraint
        batch = getattr(decoder._batch, "_generation_batch", None)  # noqa: SLF001
        lists = getattr(batch, "logits_processors", None) or []
        if decoder.batch_masks.handed_over and lists:
            assert not any(isinstance(p, ConstraintProcessor) for row in lists for p in row)
            left_lists = True
        if len(finished) == 3:
            break
    decoder.close()
    assert len(recording.made) == 2
    assert len(handed) == 2, handed  # both constrained rows, the plain one never
    assert left_lists
    stopped = [seq for seq in (0, 1) if finished.get(seq) == "stop"]
    assert stopped, (finished, texts)
    for seq in stopped:
        assert set(json.loads(texts[seq])) == {"n", "s"}, texts[seq]
    assert not decoder.batch_masks.handed_over  # every row dropped as it ended
