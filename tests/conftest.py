from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge import demo_model
from tests.harness import WorkerProcess

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The offline fixture model, built once per test session."""
    return demo_model.ensure(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def loaded_worker(tiny_model: Path) -> Iterator[WorkerProcess]:
    """One ``python -m bridge`` per test module, with the tiny model loaded."""
    with WorkerProcess("bridge") as worker:
        loaded = worker.call({"cmd": "load", "path": str(tiny_model), "id": "setup"})
        assert loaded["type"] == "loaded", loaded
        yield worker
