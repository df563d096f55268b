"""Open and read files that come from an untrusted place, without hanging.

A model directory is untrusted input (docs/security.md): any name in it may be
a FIFO, a socket, a device, a directory, a dangling symlink or a huge file.
Opening a FIFO for reading blocks until a writer appears, and inside a C
extension that holds the GIL (``mx.load`` of a FIFO ``*.safetensors``) that
freezes the whole process, stdin thread included. So:

- :func:`check_regular` looks at a file with ``stat`` (which never opens it)
  and refuses anything but a regular file of bounded size;
- :func:`open_regular` opens with ``O_NONBLOCK`` (a FIFO opens at once) and
  checks the opened file again with ``fstat``, so that a file swapped after
  the ``stat`` is still caught;
- :func:`read_bounded` reads at most a limit, and :func:`parse_json` parses
  with a nesting bound (a 100,000-deep ``config.json`` is an error, not a
  ``RecursionError``).

Every failure is ``load_failed`` with a message that starts with the request
field (``path`` or ``adapter_path``) and names the file.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from protocol.errors import LoadFailed
from protocol.fields import MAX_JSON_DEPTH, too_deep

# MAX_JSON_DEPTH (64, the requests' bound) also bounds the JSON files we parse
# ourselves; real configs nest 3-5 levels.

_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | os.O_CLOEXEC


def is_inside(path: str, root: str) -> bool:
    """Whether the real path ``path`` is ``root`` or lies under it (both
    already resolved; a plain string test, cheap enough for an audit hook)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def kind_of_mode(mode: int) -> str:
    """What a non-regular file is, in words."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "not a regular file"


def check_regular(path: Path, *, field: str, limit: int | None) -> os.stat_result:
    """``stat`` ``path`` (following symlinks) and refuse anything but a
    regular file of at most ``limit`` bytes."""
    try:
        st = os.stat(path)
    except OSError as exc:
        kind = "a broken symlink" if os.path.islink(path) else "unreadable"
        raise LoadFailed(f"{field}: {path} is {kind} ({exc.strerror})") from None
    _check_mode(path, st, field=field, limit=limit)
    return st


def open_regular(path: Path, *, field: str, limit: int | None) -> tuple[int, int]:
    """Open ``path`` for reading without blocking; returns ``(fd, size)``.
    The caller closes ``fd``."""
    check_regular(path, field=field, limit=limit)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise LoadFailed(f"{field}: cannot open {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        _check_mode(path, st, field=field, limit=limit)
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def read_exactly(fd: int, n: int, *, path: Path, field: str) -> bytes:
    chunks: list[bytes] = []
    left = n
    while left:
        try:
            chunk = os.read(fd, min(left, 1 << 20))
        except OSError as exc:
            raise LoadFailed(f"{field}: cannot read {path}: {exc.strerror}") from None
        if not chunk:
            raise LoadFailed(f"{field}: {path} ended after {n - left} of {n} bytes")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_bounded(path: Path, *, field: str, limit: int) -> bytes:
    """The whole of a regular file of at most ``limit`` bytes."""
    fd, size = open_regular(path, field=field, limit=limit)
    try:
        data = read_exactly(fd, size, path=path, field=field)
        if os.read(fd, 1):  # it grew while we read it
            raise LoadFailed(f"{field}: {path} changed while it was read")
    finally:
        os.close(fd)
    return data


def parse_json(data: bytes, *, path: Path, field: str) -> object:
    """JSON as Python's ``json`` reads it (big integers stay integers, as the
    loaders will see them), nested at most :data:`MAX_JSON_DEPTH` deep."""
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise LoadFailed(f"{field}: {path} is not valid UTF-8") from None
    except RecursionError:
        raise LoadFailed(f"{field}: {path} nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:
        raise LoadFailed(f"{field}: {path} is not valid JSON: {exc}") from None
    if too_deep(value, MAX_JSON_DEPTH) is not None:
        raise LoadFailed(f"{field}: {path} nests deeper than {MAX_JSON_DEPTH} levels")
    return value


def _check_mode(path: Path, st: os.stat_result, *, field: str, limit: int | None) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise LoadFailed(
            f"{field}: {path} is {kind_of_mode(st.st_mode)}, not a regular file; "
            "the worker reads only regular files from a model directory"
        )
    if limit is not None and st.st_size > limit:
        raise LoadFailed(
            f"{field}: {path} is {size_text(st.st_size)}, over the limit of "
            f"{size_text(limit)} for this kind of file"
        )


def size_text(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    if n >= 2**10:
        return f"{n / 2**10:.1f} KiB"
    return f"{n} bytes"
