"""Fixtures of the reliability suite: one fuzzed worker per module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability import strategies
from tests.reliability.hostile import bases
from tests.reliability.wire import FuzzWorker, fuzz_worker


@pytest.fixture(scope="module")
def fuzz(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzWorker]:
    """One ``python -m bridge`` with the tiny model, in a scratch working directory."""
    workdir = tmp_path_factory.mktemp("fuzz-cwd")
    strategies.set_bases(bases(str(tiny_model), str(workdir)))
    with fuzz_worker(tiny_model, workdir) as worker:
        yield worker
