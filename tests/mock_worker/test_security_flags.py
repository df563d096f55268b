"""The worker's security flags on the mock: a host's tests see the same ``forbidden``."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor import Worker, module_command
from supervisor.errors import RequestError
from tests.mock_worker.harness import MockWorker

pytestmark = pytest.mark.timeout(30)


def load(worker: MockWorker, **fields: object) -> dict[str, object]:
    return worker.call({"cmd": "load", "id": "l", "path": "mock-model", **fields})


def test_trust_remote_code_needs_the_flag() -> None:
    with MockWorker() as plain:
        refused = load(plain, trust_remote_code=True)
        assert refused["code"] == "forbidden", refused
        assert str(refused["error"]).startswith("trust_remote_code:"), refused
        assert load(plain, trust_remote_code=False)["type"] == "loaded"
    with MockWorker("--trust-remote-code") as trusting:
        assert load(trusting, trust_remote_code=True)["type"] == "loaded"


def test_model_root_confines_load(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "inside").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "leak").symlink_to(tmp_path / "outside")
    with MockWorker(f"--model-root={root}") as worker:
        for path in ("inside", str(root / "inside"), "not-there-yet"):
            assert load(worker, path=path)["type"] == "loaded", path
        for field, path in [
            ("path", str(tmp_path / "outside")),
            ("path", "../outside"),
            ("path", "leak"),
            ("adapter_path", str(tmp_path / "outside")),
        ]:
            fields = {"path": "inside", field: path}
            refused = worker.call({"cmd": "load", "id": "l", **fields})
            assert refused["code"] == "forbidden", (field, path, refused)
            assert str(refused["error"]).startswith(f"{field}:"), refused
        assert worker.call({"cmd": "ping", "id": "p"})["type"] == "pong"


def test_the_supervisor_starts_the_mock_with_the_workers_flags(tmp_path: Path) -> None:
    with Worker(
        command=module_command("mock_worker"),
        model_root=tmp_path,
        image_roots=[tmp_path],
        trust_remote_code=True,
    ) as worker:
        worker.load("model", trust_remote_code=True)
        with pytest.raises(RequestError) as refused:
            worker.load(str(tmp_path.parent))
        assert refused.value.code == "forbidden"
