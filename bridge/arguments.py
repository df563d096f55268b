"""argparse types shared by the worker's command-line options.

Their own module so that :mod:`bridge.cli`, the vision engine's options
(:mod:`bridge.engines.vision.options`) and ``mock_worker`` use them without
importing one another: ``cli`` imports the vision options, so those cannot
import ``cli``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be ≥ 1")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be ≥ 0")
    return value


def existing_directory(text: str) -> Path:
    path = Path(os.path.realpath(os.path.expanduser(text)))
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a directory")
    return path
