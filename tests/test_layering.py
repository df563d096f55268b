"""Import rules, checked from the AST (see STYLE.md):

- ``protocol`` imports nothing of ours;
- ``bridge`` and ``supervisor`` import ``protocol`` and never each other;
- ``mock_worker`` may use ``bridge``'s request loop but never MLX;
- only modules under ``bridge/engines/`` (the engines), ``bridge/shard/``
  (the sharded engine and its ranks) and ``bridge/demo/`` (the fixture
  builders) import MLX, mlx-lm or mlx-vlm, always lazily (inside
  functions), and ``python -m bridge`` must not import them before its first
  reply;
- the request loop, ``bridge/loop/``, knows engines only through
  ``bridge.engines.engine_protocol``, and nothing of ``bridge.model_dir`` or
  ``bridge.demo``.
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
# Packages whose modules may import MLX (always lazily, inside functions).
ENGINE_PACKAGES = ("bridge.engines", "bridge.shard", "bridge.demo")
# What the request loop may import of bridge, besides its own package.
LOOP = "bridge.loop"
LOOP_MAY_IMPORT = ("bridge.engines.engine_protocol", "bridge.versions")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, bool]]:
    """(full module name, at module level?) for every import in a file.

    Relative imports are resolved against the file's package, so that
    ``from ..engines import routing`` counts as ``bridge.engines.routing``.
    """
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(node) for node in tree.body}
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join([*base, node.module] if node.module else base)
            else:
                prefix = node.module or ""
            # `from bridge.engines import routing` imports bridge.engines.routing
            names = [f"{prefix}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            found.append((name, id(node) in top_level))
    return found


def top(name: str) -> str:
    return name.split(".")[0]


def inside(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def package_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_what_they_may(package: str) -> None:
    for path in package_files(package):
        for name, _ in imports(path):
            if top(name) in OURS and top(name) != package:
                assert top(name) in ALLOWED[package], f"{path.relative_to(ROOT)} imports {name}"


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_only_engine_modules_import_mlx(package: str) -> None:
    for path in package_files(package):
        heavy = [(name, at_top) for name, at_top in imports(path) if top(name) in HEAVY]
        if not heavy:
            continue
        rel = path.relative_to(ROOT)
        module = module_name(path)
        assert any(inside(module, p) for p in ENGINE_PACKAGES), f"{rel} imports {heavy[0][0]}"
        assert not any(at_top for _, at_top in heavy), f"{rel} imports MLX at module level"


def test_the_request_loop_knows_engines_only_by_their_protocol() -> None:
    files = package_files(LOOP.replace(".", "/"))
    assert files, "no bridge/loop/ package"
    for path in files:
        for name, _ in imports(path):
            if top(name) != "bridge" or inside(name, LOOP):
                continue
            assert any(inside(name, allowed) for allowed in LOOP_MAY_IMPORT), (
                f"{path.relative_to(ROOT)} imports {name}"
            )


def test_the_engine_packages_exist() -> None:
    # the rules above name these folders; a rename must not make them vacuous
    for package in (*ENGINE_PACKAGES, "bridge.model_dir", LOOP):
        assert (ROOT / package.replace(".", "/") / "__init__.py").is_file(), package


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
