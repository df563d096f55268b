"""Whether MLX's CUDA build runs attention through cuDNN, chosen before MLX is imported.

MLX's cuDNN attention builds a graph for every new (query length, key
length) pair: 50-100 ms on an H200 the first time a pair is seen, against a
few milliseconds per attention call after that. A server meets new pairs all
the time (every prompt has its own length, every prefill chunk of a long
prompt its own key length, every warm turn its own suffix), so the worker
turns it off unless asked: a chunk of a long prompt that is prefilled
between two decode steps then costs its compute, not a graph build
(docs/benchmarks.md has the figures). Long prefills are slower without it
(about 2.8x at 8,192 tokens), so ``--cudnn-attention`` turns it back on, and
an ``MLX_CUDA_USE_CUDNN_SDPA`` already set in the environment wins.

Only MLX's CUDA build reads the variable; elsewhere it changes nothing.
"""

from __future__ import annotations

import os

VARIABLE = "MLX_CUDA_USE_CUDNN_SDPA"


def choose_cudnn_attention(enabled: bool) -> None:
    """Set MLX's switch for this process (and its children), unless already set."""
    os.environ.setdefault(VARIABLE, "1" if enabled else "0")
