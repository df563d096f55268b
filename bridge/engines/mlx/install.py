"""Whether MLX and mlx-lm import here, and what to install when they do not.

A worker started in a Python without MLX (or, on Linux, with ``mlx`` but no
backend: ``mlx-cpu`` or ``mlx-cuda-*`` provides ``libmlx.so``) still
answers ``hello``; ``load`` and the commands that need a model fail with
``mlx_missing`` and an install hint, never with a traceback.

The import is tried once, on the engine thread (``warm_up``), and its result
kept: importing MLX from the stdin thread would hold the GIL for a while.
"""

from __future__ import annotations

import logging
import sys
import threading

from bridge.versions import package_versions
from protocol.errors import MlxMissing, RequestId

log = logging.getLogger("bridge.engine")

_BACKENDS = ("mlx-cpu", "mlx-cuda-12", "mlx-cuda-13")

_lock = threading.Lock()
_problem: list[str] = []  # empty until checked; then [""] (fine) or [what failed]


def install_hint(platform: str | None = None) -> str:
    """The commands that install MLX for this platform."""
    if (platform or sys.platform) == "darwin":
        return "pip install mlx-lm (or pip install mlx-bridge, which pulls it in)"
    return (
        "on Linux, pip install 'mlx-bridge[cpu]' for the CPU or 'mlx-bridge[cuda]' for an "
        "NVIDIA GPU (CUDA 13), or by hand pip install mlx-lm 'mlx[cpu]' (or 'mlx[cuda13]')"
    )


def mlx_problem() -> str | None:
    """None when ``mlx.core`` and ``mlx_lm`` import; else what went wrong.

    Checked once; call it from the engine thread only.
    """
    with _lock:
        if not _problem:
            _problem.append(_try_import())
            _warn_of_two_backends()
            if _problem[0]:
                log.warning(
                    "MLX is not usable in %s: %s; load will fail with mlx_missing. Install: %s",
                    sys.executable,
                    _problem[0],
                    install_hint(),
                )
        return _problem[0] or None


def require_mlx(request_id: RequestId | None) -> None:
    """Raise ``mlx_missing``, with the install hint, when MLX cannot be imported."""
    problem = mlx_problem()
    if problem is not None:
        raise MlxMissing(
            f"MLX is not installed in the worker's Python ({sys.executable}): {problem}. "
            f"Install it: {install_hint()}",
            request_id=request_id,
        )


def _warn_of_two_backends() -> None:
    """mlx-cpu and mlx-cuda-* both install mlx/lib/libmlx.so: the last one
    pip wrote is in use, and uninstalling either deletes it for both."""
    found = package_versions((), optional=_BACKENDS)
    found.pop("bridge", None)
    if len(found) > 1:
        names = " ".join(sorted(found))
        log.warning(
            "MLX backends %s are all installed; they share mlx/lib/libmlx.so, so the one "
            "installed last is in use. Keep one: pip uninstall -y %s, then pip install "
            "'mlx-bridge[cuda]' (or '[cpu]')",
            ", ".join(sorted(found)),
            names,
        )


def _try_import() -> str:
    try:
        import mlx.core  # noqa: F401
        import mlx_lm  # noqa: F401
    except ImportError as exc:  # ModuleNotFoundError, or a missing libmlx.so
        return f"{type(exc).__name__}: {exc}"
    return ""
