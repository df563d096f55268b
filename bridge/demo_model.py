"""``python -m bridge.demo_model DIR``: build the tiny offline fixture model.

The public name of :mod:`bridge.demo.model`, which holds the builder (see its
docstring for what it writes and why). The README, the conformance kit, the
Go, Rust and Node examples and the tests run or import this name, so it stays
while the code lives with the other fixture builders in :mod:`bridge.demo`.

Usage::

    python -m bridge.demo_model OUT_DIR [--seed N] [--template NAME] [--force]
"""

from __future__ import annotations

import sys

from bridge.demo.model import (
    BUILDER_VERSION,
    DEFAULT_TEMPLATE,
    MAX_POSITIONS,
    SPECIAL_TOKENS,
    STAMP_NAME,
    TEMPLATES,
    TOKENIZER_VOCAB_SIZE,
    build,
    ensure,
    main,
)

__all__ = [
    "BUILDER_VERSION",
    "DEFAULT_TEMPLATE",
    "MAX_POSITIONS",
    "SPECIAL_TOKENS",
    "STAMP_NAME",
    "TEMPLATES",
    "TOKENIZER_VOCAB_SIZE",
    "build",
    "ensure",
    "main",
]

if __name__ == "__main__":
    sys.exit(main())
