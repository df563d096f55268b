"""Python code that ships in a model directory: when it may run, and a guard that stops it.

A model directory can name Python code of its own in several ways:
``auto_map`` in ``config.json``, ``tokenizer_config.json``,
``processor_config.json`` or ``preprocessor_config.json`` (transformers then
copies the named ``*.py`` files into its modules cache and imports them), and
``model_file`` in ``config.json`` (mlx-lm and mlx-vlm import that file as the
model's architecture). Code from a model directory runs only when both say
so: the worker was started with ``--trust-remote-code`` *and* the ``load``
request has ``"trust_remote_code": true`` (:func:`remote_code_allowed`). A
request that asks on a worker without the flag is ``forbidden``, before the
directory is read.

When code is not allowed, the engines pass ``trust_remote_code=False``
explicitly to mlx-lm, mlx-vlm and transformers (whose defaults differ: some
of mlx-vlm's processors default it to true, a few hard-code it), and run the
library's load inside :class:`CodeGuard`: a process-wide audit hook
(:func:`sys.addaudithook`) that, while the load runs, refuses to execute or
import anything inside the model directory or transformers'
``transformers_modules`` cache, or to open a code file there (``*.py``,
``*.pyc``, ``*.so``, …: a ``.pyc`` may name any file as its source, so
opening is what gives it away), on any thread, and on the loading thread also
any Python file or extension module that is not part of the installed
packages (the standard library, site-packages, ``sys.path`` other than the
working directory, and this project's packages) and any unpickling. The
refusal is a :class:`BaseException`, which a library's ``except Exception``
cannot swallow, and it is also recorded, so the load fails with
``load_failed`` even if a library does swallow it.
"""

from __future__ import annotations

import os
import site
import sys
import sysconfig
import threading
from pathlib import Path
from types import CodeType, TracebackType
from typing import Any

from bridge.model_dir.untrusted import is_inside
from protocol.errors import Forbidden, LoadFailed, RequestId
from protocol.requests import Load

TRUST_FLAG = "--trust-remote-code"
MODULES_CACHE_DIR = "transformers_modules"

# Files whose opening, inside the model directory or the modules cache, means
# loading code: a loader may import a ``.pyc`` whose code object names any
# file (``<frozen …>``), so the ``exec`` check alone cannot see where it came
# from, but it must open the file first.
CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".pyw", ".so", ".pyd", ".dylib", ".dll")


def remote_code_allowed(request: Load, *, worker_allows: bool) -> bool:
    """Whether code from the model directory may run for this load.

    Raises ``forbidden`` when the request asks for it and the worker was not
    started with ``--trust-remote-code``; call it before reading anything."""
    if request.trust_remote_code and not worker_allows:
        raise Forbidden(
            f"trust_remote_code: true needs a worker started with {TRUST_FLAG}; "
            "this worker runs no code from model directories",
            request_id=request.id,
        )
    return request.trust_remote_code and worker_allows


class _Refused(BaseException):
    """Raised from the audit hook; a ``BaseException`` so that a library's
    ``except Exception`` does not turn it into a fallback that runs on."""


class CodeGuard:
    """While entered (and ``allowed`` is false), code from the model directory
    cannot run on any thread, and on the entering thread no code from outside
    the installed packages can run and nothing can be unpickled.

    Leaving the block raises ``load_failed`` naming what was refused when
    anything was, whatever the library did with the refusal."""

    def __init__(self, directory: Path, *, allowed: bool, request_id: RequestId | None) -> None:
        self._directory = os.path.realpath(directory)
        self._allowed = allowed
        self._request_id = request_id
        self._thread = 0
        self.refused: list[str] = []

    def __enter__(self) -> CodeGuard:
        if not self._allowed:
            _install_hook()
            self._thread = threading.get_ident()
            _guards[self._thread] = self
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._allowed:
            return
        _guards.pop(self._thread, None)
        if self.refused:
            raise LoadFailed(
                f"path: the model wants to run {self.refused[0]}, which this worker refused; "
                'code from a model directory runs only with "trust_remote_code": true on a '
                f"worker started with {TRUST_FLAG}",
                request_id=self._request_id,
            ) from None

    def check_file(self, filename: str, *, owner: bool) -> None:
        """Raise :class:`_Refused` if code from ``filename`` may not run;
        ``owner``: on the thread that entered the guard."""
        if not os.path.isabs(filename):
            return  # "<string>", "<frozen …>", jinja's "<template>": code made in memory
        real = os.path.realpath(filename)
        if is_inside(real, self._directory) or MODULES_CACHE_DIR in Path(real).parts:
            self._refuse(f"Python code from {filename}")
        if owner and not any(is_inside(real, root) for root in _trusted_roots()):
            self._refuse(f"Python code from {filename}")

    def check_open(self, path: str) -> None:
        """Raise :class:`_Refused` if ``path`` is a code file from the model
        directory or the modules cache (any thread)."""
        if not path.endswith(CODE_SUFFIXES):
            return
        real = os.path.realpath(path)
        if is_inside(real, self._directory) or MODULES_CACHE_DIR in Path(real).parts:
            self._refuse(f"Python code from {path}")

    def check_unpickle(self, module: object, name: object) -> None:
        # a pickle can call anything it names: loading one is running code
        self._refuse(f"a pickle (it names {module}.{name})")

    def _refuse(self, what: str) -> None:
        self.refused.append(what)
        raise _Refused(what)


# -- the audit hook ----------------------------------------------------------------------

_guards: dict[int, CodeGuard] = {}
_hook_lock = threading.Lock()
_hook_installed = False
_roots: tuple[str, ...] | None = None


def _install_hook() -> None:
    global _hook_installed
    with _hook_lock:
        if not _hook_installed:
            _trusted_roots()  # computed now, while sys.path is the worker's own
            sys.addaudithook(_audit)
            _hook_installed = True


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _guards or event not in _EVENTS:
        return
    own = _guards.get(threading.get_ident())
    if own is not None:
        _check(own, event, args, owner=True)
    else:  # another thread (one a library started, say): the model-directory rule only
        for guard in tuple(_guards.values()):
            _check(guard, event, args, owner=False)


def _check(guard: CodeGuard, event: str, args: tuple[Any, ...], *, owner: bool) -> None:
    match event:
        case "exec":
            code = args[0] if args else None
            if isinstance(code, CodeType):
                guard.check_file(code.co_filename, owner=owner)
        case "import":
            filename = args[1] if len(args) > 1 else None  # extension modules give their file
            if isinstance(filename, str):
                guard.check_file(filename, owner=owner)
        case "ctypes.dlopen":
            name = args[0] if args else None
            if isinstance(name, str) and os.path.isabs(name):
                guard.check_file(name, owner=owner)
        case "open":
            path = args[0] if args else None
            if isinstance(path, bytes):
                path = os.fsdecode(path)
            if isinstance(path, str):
                guard.check_open(path)
        case "pickle.find_class":
            if owner:
                guard.check_unpickle(*args[:2])


_EVENTS = frozenset({"exec", "import", "open", "ctypes.dlopen", "pickle.find_class"})


def _trusted_roots() -> tuple[str, ...]:
    global _roots
    if _roots is None:
        paths = {
            sysconfig.get_path(name) for name in ("stdlib", "platstdlib", "purelib", "platlib")
        }
        paths.update(site.getsitepackages())
        paths.add(site.getusersitepackages())
        cwd = os.path.realpath(os.getcwd())
        paths.update(p for p in sys.path if p and os.path.isabs(p) and os.path.realpath(p) != cwd)
        here = Path(__file__).resolve().parent
        paths.update((str(here), str(here.parent / "protocol")))
        _roots = tuple(sorted({os.path.realpath(p) for p in paths if p}))
    return _roots
