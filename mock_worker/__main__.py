import os
import sys

# As in bridge/__main__.py: files in the working directory must not shadow
# our modules (or orjson) when it is not where this package lives.
_cwd = os.path.realpath(os.getcwd())
_home = os.path.realpath(os.path.dirname(os.path.dirname(__file__)))
if sys.path and os.path.realpath(sys.path[0] or os.curdir) == _cwd != _home:
    del sys.path[0]

from mock_worker.cli import main  # noqa: E402

raise SystemExit(main())
