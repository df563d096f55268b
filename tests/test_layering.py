"""Import rules, checked from the AST (see STYLE.md):

- ``protocol`` imports nothing of ours;
- ``bridge`` and ``supervisor`` import ``protocol`` and never each other;
- ``mock_worker`` may use ``bridge``'s request loop but never MLX;
- only engine modules and fixture builders import MLX, mlx-lm or mlx-vlm,
  and ``python -m bridge`` must not import them before its first reply.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import ROOT, worker_env

OURS = {"protocol", "bridge", "supervisor", "mock_worker"}
HEAVY = {"mlx", "mlx_lm", "mlx_vlm"}
ALLOWED = {
    "protocol": set(),
    "bridge": {"protocol"},
    "supervisor": {"protocol"},
    "mock_worker": {"protocol", "bridge"},
}
# Modules allowed to import MLX (always lazily, inside functions).
ENGINE_MODULES = ("mlx_", "vlm_", "demo_", "inspect")


def imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level package, at module level?) for every import in a file."""
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            found.append((name.split(".")[0], id(node) in top_level))
    return found


def package_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_what_they_may(package: str) -> None:
    for path in package_files(package):
        for name, _ in imports(path):
            if name in OURS and name != package:
                assert name in ALLOWED[package], f"{path.relative_to(ROOT)} imports {name}"


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_only_engine_modules_import_mlx(package: str) -> None:
    for path in package_files(package):
        heavy = [(name, top) for name, top in imports(path) if name in HEAVY]
        if not heavy:
            continue
        rel = path.relative_to(ROOT)
        assert package == "bridge" and path.name.startswith(ENGINE_MODULES), (
            f"{rel} imports {heavy[0][0]}"
        )
        assert not any(top for _, top in heavy), f"{rel} imports MLX at module level"


def test_the_worker_answers_before_importing_mlx() -> None:
    probe = (
        "import sys, runpy; sys.argv = ['bridge', '--help']\n"
        "try:\n    runpy.run_module('bridge', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print(sorted(m for m in ('mlx', 'mlx_lm', 'mlx_vlm', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env=worker_env(),
        cwd=ROOT,
        check=True,
    ).stdout
    assert out.strip().splitlines()[-1] == "[]"
