"""Launching the worker from a working directory full of look-alike modules.

Plain ``python -m bridge`` puts the working directory first on the import
path, so a host that runs from a directory holding a ``bridge.py`` (go-mlx's
own host does) ran that file instead of the worker. Every launcher of this
project (the supervisor's default command, ``module_command``, the
conformance kit, the console scripts) must be immune: here each look-alike
writes a marker file and exits, and none may run.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from protocol.conformance.process import imports_from_cwd, worker_command
from supervisor import AsyncWorker, Worker, module_command
from supervisor.settings import default_command
from tests.supervisor.conftest import ENV, FAST, ROOT

pytestmark = pytest.mark.timeout(120)

LOOK_ALIKES = (
    "bridge",
    "protocol",
    "supervisor",
    "mock_worker",
    "orjson",
    "psutil",
    "runpy",
    "mlx_lm",
)


@pytest.fixture
def hostile(tmp_path: Path) -> Path:
    """A directory whose every look-alike module leaves a marker and exits 3."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for name in LOOK_ALIKES:
        marker = tmp_path / f"ran-{name}"
        (cwd / f"{name}.py").write_text(
            f"import os\nopen({str(marker)!r}, 'w').close()\nos._exit(3)\n", encoding="utf-8"
        )
    return cwd


def markers(hostile: Path) -> list[str]:
    return sorted(p.name for p in hostile.parent.glob("ran-*"))


def test_plain_python_m_runs_the_look_alike(hostile: Path) -> None:
    # the hole itself, so that the tests below test something
    done = subprocess.run(
        [sys.executable, "-m", "bridge", "--help"], cwd=hostile, env=os.environ | ENV
    )
    assert done.returncode == 3 and markers(hostile) == ["ran-bridge"]


def test_the_default_command_is_safe_from_the_working_directory(
    hostile: Path, tiny_model: Path
) -> None:
    assert default_command() == module_command("bridge")
    with Worker(model=str(tiny_model), env=ENV, cwd=str(hostile), **FAST) as w:
        assert w.generate("hello", max_tokens=3).text() != ""
        assert w.hello.versions["bridge"]
    assert markers(hostile) == []


def test_the_mock_through_module_command_is_safe(hostile: Path) -> None:
    command = module_command("mock_worker")
    with Worker(command, model="mock-model", env=ENV, cwd=str(hostile), **FAST) as w:
        assert w.generate("a b c", max_tokens=3).text() == "a b c"
    assert markers(hostile) == []


def test_the_async_worker_default_is_safe_too(hostile: Path, tiny_model: Path) -> None:
    async def main() -> None:
        async with AsyncWorker(model=str(tiny_model), env=ENV, cwd=str(hostile), **FAST) as w:
            assert await w.generate("hello", max_tokens=3).text() != ""

    asyncio.run(asyncio.wait_for(main(), 60))
    assert markers(hostile) == []


def test_the_python_3_10_form_is_safe_too(hostile: Path) -> None:
    # what module_command gives on 3.10, which has no -P; run here on this Python
    from protocol.launch import _RUN_MODULE_SAFELY

    command = (sys.executable, "-c", _RUN_MODULE_SAFELY, "mock_worker")
    with Worker(command, model="mock-model", env=ENV, cwd=str(hostile), **FAST) as w:
        assert w.generate("a b", max_tokens=2).text() == "a b"
    assert markers(hostile) == []


def test_the_conformance_kit_runs_a_bare_python_with_its_own_interpreter(
    hostile: Path,
) -> None:
    assert worker_command(["python", "-m", "bridge", "--x"]) == module_command("bridge", "--x")
    assert worker_command(["python3", "w.py"]) == (sys.executable, "w.py")
    assert worker_command(["./my-worker"]) == ("./my-worker",)
    done = subprocess.run(
        [*module_command("protocol.conformance"), "--only", "startup"]
        + ["--", "python", "-m", "mock_worker"],
        cwd=hostile,
        env=os.environ | ENV | {"PATH": "/nonexistent"},  # a bare python must not be looked up
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert " 0 failed" in done.stdout
    assert markers(hostile) == []


def test_the_console_script_names_itself_and_the_installed_schema(tmp_path: Path) -> None:
    # what pip writes for [project.scripts] mlx-bridge = "bridge.cli:script"
    script = tmp_path / "mlx-bridge"
    script.write_text(
        f"#!{sys.executable}\nimport sys\nfrom bridge.cli import script\nsys.exit(script())\n"
    )
    script.chmod(0o755)
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, env=env, check=True
    ).stdout
    assert out.startswith("usage: mlx-bridge ")
    assert "docs/protocol.md" in out and "protocol.schema.json" in out  # no bare repo path
    out = subprocess.run(
        [*module_command("bridge"), "--help"], capture_output=True, text=True, env=env, check=True
    ).stdout
    assert out.startswith("usage: python -m bridge ")


@pytest.mark.parametrize("module", ["bridge", "mock_worker"])
def test_plain_python_m_drops_the_working_directory_it_does_not_live_in(
    module: str, hostile: Path
) -> None:
    # Defence in depth for hosts that still run plain `python -m bridge`: with
    # no bridge.py there, the package's __main__ runs first and takes the
    # working directory off the path before anything else is imported.
    (hostile / "bridge.py").unlink()
    (hostile / "mock_worker.py").unlink()
    done = subprocess.run(
        [sys.executable, "-m", module],
        input=b'{"cmd":"hello","id":1}\n',
        capture_output=True,
        cwd=hostile,
        env=os.environ | ENV,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.startswith(b'{"type":"hello","id":1,')
    assert markers(hostile) == []


@pytest.mark.parametrize(
    ("command", "hijackable"),
    [
        (["python", "-m", "bridge"], True),
        (["/venv/bin/python3.11", "-u", "-m", "bridge"], True),
        (["python", "-X", "importtime", "-m", "bridge"], True),
        (["python", "-um", "bridge"], True),
        (["python", "-P", "-m", "bridge"], False),
        (["python", "-Pm", "bridge"], False),
        (["python", "-I", "-m", "bridge"], False),
        (["python", "worker.py"], False),
        (["python", "-c", "pass"], False),
        (["mlx-bridge"], False),
        (["./my-worker", "-m", "x"], False),
    ],
)
def test_the_kit_knows_which_commands_import_from_the_working_directory(
    command: list[str], hijackable: bool
) -> None:
    assert imports_from_cwd(command) is hijackable


def test_the_kit_warns_of_a_hijackable_command(tmp_path: Path) -> None:
    done = subprocess.run(
        [*module_command("protocol.conformance"), "--only", "startup / hello"]
        + ["--", sys.executable, "-m", "mock_worker"],
        cwd=ROOT,
        env=os.environ | ENV,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "-m imports from the working directory first" in done.stderr
