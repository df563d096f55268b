"""Installed package versions for ``hello``, read from ``*.dist-info`` names.

``importlib.metadata`` would do, but importing it and asking for four
versions costs about 35 ms (it pulls in the ``email`` package), all of it
inside the answer to the host's first ``hello``. Installers name the
metadata directory ``{name}-{version}.dist-info`` (the wheel spec), so one
listing of each ``sys.path`` entry gives every version in under a
millisecond. A package found no other way (an egg-info install, a zip) is
looked up with ``importlib.metadata`` after all.
"""

from __future__ import annotations

import os
import sys

__all__ = ["package_versions"]


def package_versions(names: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, str]:
    """``bridge`` and each of ``names`` (``"unknown"`` when not found), plus
    each of ``optional`` that is installed."""
    installed = _dist_infos(sys.path)
    out = {"bridge": _version("mlx-bridge", installed) or "unknown"}
    for name in names:
        out[name] = _version(name, installed) or "unknown"
    for name in optional:
        if (version := installed.get(_normalize(name))) is not None:
            out[name] = version
    return out


def _dist_infos(paths: list[str]) -> dict[str, str]:
    """Normalized distribution name → version; the first on the path wins, as on import."""
    found: dict[str, str] = {}
    for entry in paths:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for filename in names:
            if filename.endswith(".dist-info"):
                name, _, version = filename[: -len(".dist-info")].partition("-")
                if version:
                    found.setdefault(_normalize(name), version)
    return found


def _version(dist: str, installed: dict[str, str]) -> str | None:
    version = installed.get(_normalize(dist))
    if version is not None:
        return version
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _normalize(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")
