"""pyproject.toml: one MLX backend per install, and the console scripts.

On Linux ``mlx-cpu`` and ``mlx-cuda-13`` both install ``mlx/lib/libmlx.so``;
with both, whichever pip wrote last is in use. So no backend may be a base
dependency (``[cuda]`` would then install both), ``[cuda]`` must not pull in
the CPU build, and the README's ``pip install -e '.[dev]'`` must still give a
CPU machine a working MLX. (``pip install --dry-run --report`` of ``.[cuda]``
lists ``mlx-cuda-13`` and no ``mlx-cpu``; this test checks the declarations
that make it so, offline.)
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement

from tests.harness import ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

LINUX = {"sys_platform": "linux", "platform_system": "Linux"}


def project() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        data: dict[str, Any] = tomllib.load(f)
    table: dict[str, Any] = data["project"]
    return table


def mlx_extras_on_linux(requirements: list[str], *, extras: dict[str, list[str]]) -> set[str]:
    """The extras of ``mlx`` these requirements select on Linux (self-extras followed)."""
    found: set[str] = set()
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(LINUX | {"extra": ""}):
            continue
        if req.name == "mlx":
            found |= req.extras
        elif req.name == "mlx-bridge":
            for extra in req.extras:
                found |= mlx_extras_on_linux(extras[extra], extras=extras)
        assert req.name not in ("mlx-cpu", "mlx-cuda-12", "mlx-cuda-13"), text
    return found


def test_no_backend_is_a_base_dependency() -> None:
    p = project()
    assert mlx_extras_on_linux(p["dependencies"], extras=p["optional-dependencies"]) == set()


def test_each_extra_selects_one_backend() -> None:
    extras = project()["optional-dependencies"]
    backends = {name: mlx_extras_on_linux(reqs, extras=extras) for name, reqs in extras.items()}
    assert backends["cpu"] == {"cpu"}
    assert backends["cuda"] == {"cuda13"}
    assert backends["cuda12"] == {"cuda12"}
    assert backends["dev"] == {"cpu"}  # the README's command, on a CPU machine
    assert backends["tools"] == set()  # for `.[cuda,tools]` on a GPU machine
    assert backends["vlm"] == set()


def test_the_console_scripts_exist() -> None:
    scripts = project()["scripts"]
    assert scripts == {"mlx-bridge": "bridge.cli:script", "mlx-bridge-mock": "mock_worker.cli:main"}
    for target in scripts.values():
        module, _, name = target.partition(":")
        assert callable(getattr(importlib.import_module(module), name))


def test_the_readme_names_the_extras() -> None:
    readme = Path(ROOT / "README.md").read_text(encoding="utf-8")
    for command in (
        "pip install 'mlx-bridge[cpu]'",
        "pip install 'mlx-bridge[cuda]'",
        "pip install -e '.[dev]'",
    ):
        assert command in readme
