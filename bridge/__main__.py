import os
import sys

# ``python -m bridge`` put the working directory first on sys.path: a
# ``protocol.py`` or ``orjson.py`` there would be imported instead of ours.
# Drop it, unless it is where this package lives (a source checkout run in
# place). A ``bridge.py`` there ran instead of this file; only the launch
# command avoids that: ``mlx-bridge``, ``python -P -m bridge`` (3.11+).
_cwd = os.path.realpath(os.getcwd())
_home = os.path.realpath(os.path.dirname(os.path.dirname(__file__)))
if sys.path and os.path.realpath(sys.path[0] or os.curdir) == _cwd != _home:
    del sys.path[0]

from bridge.cli import script  # noqa: E402

script()
