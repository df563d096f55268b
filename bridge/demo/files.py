"""Write a demo fixture's directory: its JSON files, its stamp, and the atomic install.

:mod:`bridge.demo_model` and :mod:`bridge.demo.vlm` build their models through
``build``: the files go into a temporary sibling directory, the stamp
(``STAMP_NAME``, the builder's own JSON) is written last, and the directory is
renamed into place. So an interrupted or concurrent build never leaves a
half-written model behind (a killed build may leave a hidden
``.NAME.building-*`` sibling to delete). ``build`` refuses to replace a
directory that has no stamp; ``is_current`` tells whether a directory holds
the build that a stamp names. ``command_line`` is both builders' ``main``.
"""

from __future__ import annotations

import argparse
import errno
import json
import pathlib
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Final

__all__ = [
    "STAMP_NAME",
    "build",
    "check_replaceable",
    "command_line",
    "is_current",
    "write_json",
]

STAMP_NAME: Final = ".mlx_bridge_fixture"


def is_current(target: pathlib.Path, stamp: dict[str, Any]) -> bool:
    """Whether ``target``'s stamp file holds exactly ``stamp``."""
    try:
        found = json.loads((target / STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(found == stamp)


def build(
    target: pathlib.Path,
    *,
    stamp: dict[str, Any],
    write: Callable[[pathlib.Path], None],
    keep_current: bool,
    what: str,
) -> pathlib.Path:
    """Have ``write`` fill a staging directory, stamp it and install it at ``target``.

    Returns ``target``'s absolute path. With ``keep_current``, a build that
    another process installed meanwhile with the same stamp is kept. ``what``
    names the model in the error raised when installing keeps failing.
    """
    target = target.absolute()
    check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private
        write(staging)
        write_json(staging / STAMP_NAME, stamp)
        _install(staging, target, stamp=stamp, keep_current=keep_current, what=what)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _install(
    staging: pathlib.Path,
    target: pathlib.Path,
    *,
    stamp: dict[str, Any],
    keep_current: bool,
    what: str,
) -> None:
    """Rename ``staging`` to ``target``, moving an earlier fixture out of the way.

    ``target`` is never half-written: it is absent, the old fixture, or the new
    one. Another process may install its own build between our steps; then we
    retry, or with ``keep_current`` accept its result.
    """
    for _ in range(10):
        try:
            staging.rename(target)
            return
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                raise
        if keep_current and is_current(target, stamp):
            return
        check_replaceable(target)
        retired = target.with_name(f".{target.name}.retired-{uuid.uuid4().hex}")
        try:
            target.rename(retired)
        except FileNotFoundError:
            continue
        shutil.rmtree(retired, ignore_errors=True)
    raise RuntimeError(f"could not install the {what} at {target}")


def check_replaceable(target: pathlib.Path) -> None:
    """Raise ``FileExistsError`` unless ``target`` is absent, empty or stamped."""
    if not target.exists() or (target / STAMP_NAME).is_file():
        return
    if target.is_dir() and not any(target.iterdir()):
        return
    raise FileExistsError(
        errno.EEXIST, "not a demo-model directory; refusing to replace", str(target)
    )


def write_json(path: pathlib.Path, data: dict[str, Any]) -> None:
    """Sorted keys, two-space indent and a final newline, so builds compare byte for byte."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def command_line(
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    build: Callable[..., pathlib.Path],
    ensure: Callable[..., pathlib.Path],
    add_options: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """Build (or reuse, with ``ensure``) ``OUT_DIR`` and write its path to stdout.

    The builder gets ``OUT_DIR``, ``seed=`` and one keyword per option that
    ``add_options`` adds (by its ``dest``); ``--force`` calls ``build``.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("out_dir", metavar="OUT_DIR", help="directory to write")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (0)")
    if add_options is not None:
        add_options(parser)
    parser.add_argument("--force", action="store_true", help="rebuild even if the stamp is current")
    options = vars(parser.parse_args(argv))
    out_dir = options.pop("out_dir")
    builder = build if options.pop("force") else ensure
    try:
        path = builder(out_dir, **options)
    except FileExistsError as exc:
        parser.exit(1, f"{parser.prog}: error: {exc}\n")
    sys.stdout.write(f"{path}\n")
    return 0
