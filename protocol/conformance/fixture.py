"""The model the kit loads: ``--model PATH``, or the project's tiny fixture model.

``protocol`` must not import the worker's packages, so the fixture is built
the way a user would build it, in a child process::

    python -m bridge.demo_model DIR

(a 0.8 MB random-weight qwen3 model, built offline in a few seconds; it needs
``mlx`` and ``mlx-lm``). When that module is not importable, or the build
fails, there is no model and the kit skips the model cases, loudly.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from ..launch import module_command

__all__ = ["ModelChoice", "choose_model"]

BUILD_TIMEOUT_S: Final = 300.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelChoice:
    path: str | None
    """The path sent in ``load`` requests; None: no model, skip those cases."""
    note: str
    """Where it came from, or why there is none."""


def choose_model(
    given: str | None, scratch: pathlib.Path, *, env: Mapping[str, str], needed: bool
) -> ModelChoice:
    if given is not None:
        return ModelChoice(path=given, note="--model")
    if not needed:
        return ModelChoice(path=None, note="not needed by the selected cases")
    return _build_fixture(scratch / "tiny-model", env=env)


def _build_fixture(target: pathlib.Path, *, env: Mapping[str, str]) -> ModelChoice:
    command = module_command("bridge.demo_model", str(target))
    shown = "python -m bridge.demo_model"
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            timeout=BUILD_TIMEOUT_S,
            env=dict(env),
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return ModelChoice(path=None, note=f"{shown} took over {BUILD_TIMEOUT_S:g} s")
    except OSError as exc:
        return ModelChoice(path=None, note=f"{shown} could not run: {exc}")
    if done.returncode != 0:
        err = done.stderr.decode("utf-8", "replace").strip()
        if "No module named" in err:
            why = f"{shown} is not importable here ({err.splitlines()[-1]})"
        else:
            last = err.splitlines()[-1] if err else f"exit status {done.returncode}"
            why = f"{shown} failed: {last}"
        return ModelChoice(path=None, note=f"{why}; pass --model PATH")
    out = done.stdout.decode("utf-8", "replace").strip().splitlines()
    path = out[-1] if out else os.fspath(target)
    return ModelChoice(path=path, note=f"the tiny fixture model, built with {shown}")
