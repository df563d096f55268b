"""TextDecoder driven directly, in process, with the tiny fixture model (engine thread: this one)."""

from __future__ import annotations

from collections.abc import Iterator
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
