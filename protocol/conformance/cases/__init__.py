"""The kit's table of cases, in the order they run.

Groups without a model come first (they need nothing but the worker), then
the groups that load the model.
"""

from __future__ import annotations

from typing import Final

from ..table import Group
from . import bad_input, batching, cancel, generation, legacy, startup

__all__ = ["GROUPS"]

GROUPS: Final[tuple[Group, ...]] = (
    startup.GROUP,
    bad_input.GROUP,
    generation.GROUP,
    legacy.GROUP,
    cancel.GROUP,
    batching.GROUP,
    cancel.EOF_GROUP,
)
