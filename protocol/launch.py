"""How a Python host runs a worker module so that its working directory cannot hijack it.

Plain ``python -m bridge`` puts the working directory first on the import
path, so a ``bridge.py``, ``protocol.py`` or ``orjson.py`` there would run
instead of ours (go-mlx's own host runs from a directory holding a
``bridge.py``). ``-P`` (Python 3.11+) leaves the working directory out; on
3.10 the module is run through ``runpy`` after dropping it. ``PYTHONPATH``
still counts. Used by the supervisor and the conformance kit alike.
"""

from __future__ import annotations

import sys
from typing import Final

__all__ = ["module_command"]

# Python 3.10 has no -P: this does what it does, for one module run as
# ``python -c CODE MODULE ARGS...``. With -c, sys.path[0] is '' (the working
# directory) until the code removes it; nothing of ours is imported before.
_RUN_MODULE_SAFELY: Final = (
    "import sys; del sys.path[0]; import runpy; "
    "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)"
)


def module_command(module: str, *args: str) -> tuple[str, ...]:
    """``python -m MODULE ARGS`` with this interpreter, safe from the working directory."""
    if sys.version_info >= (3, 11):
        return (sys.executable, "-P", "-m", module, *args)
    return (sys.executable, "-c", _RUN_MODULE_SAFELY, module, *args)
