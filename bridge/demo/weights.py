"""Seeded random weights that make a tiny demo model decode decisively.

Random weights give near-uniform logits, and greedy decoding over near-ties
flips on tiny floating-point differences. :mod:`bridge.demo_model` and
:mod:`bridge.demo.vlm` therefore shape their weights alike: the embedding
matrix has std 1 (tied, so it is also the output head), the final norm
multiplies the logits by 3, the text model's attention and MLP output
projections are scaled up so that the layers, not the input token, pick the
next token, and the embedding rows of ``quiet_rows`` (specials, byte tokens
that are not printable ASCII, padding ids) are shrunk 100-fold. Other weights
are normal with std ``1 / sqrt(fan_in)``; biases are zero.

Each parameter gets its own PRNG key from ``seed`` (in sorted name order), and
the draws run on the CPU stream, so the same seed gives the same bytes on
machines with and without a GPU.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final, cast

if TYPE_CHECKING:
    import mlx.core as mx
    from mlx.nn import Module

__all__ = ["padded_vocab_size", "write_weights"]

_EMBED_STD: Final = 1.0
_OUT_PROJ_GAIN: Final = 16.0
_FINAL_NORM_GAIN: Final = 3.0
_QUIET_ROW_SCALE: Final = 0.01
_VOCAB_MULTIPLE: Final = 64


def padded_vocab_size(tokenizer_vocab: int) -> int:
    """The embedding's row count: the tokenizer's vocabulary rounded up to a multiple of 64."""
    return -(-tokenizer_vocab // _VOCAB_MULTIPLE) * _VOCAB_MULTIPLE


def write_weights(
    path: pathlib.Path,
    make_model: Callable[[], Module],
    *,
    seed: int,
    quiet_rows: Sequence[int],
    text_prefix: str = "",
) -> None:
    """Build ``make_model()``, give it seeded weights and write ``path / "model.safetensors"``.

    ``text_prefix`` is where the text model's parameters sit (``""`` for an
    mlx-lm model, ``"language_model."`` for an mlx-vlm one).
    """
    import mlx.core as mx

    with mx.stream(mx.cpu):
        model = make_model()
        shapes = {name: tuple(a.shape) for name, a in _parameters(model).items()}
        weights = _init_weights(shapes, seed=seed, quiet_rows=quiet_rows, text_prefix=text_prefix)
        model.load_weights(list(weights.items()), strict=True)
        flat = _parameters(model)
        mx.eval(flat)
    mx.save_safetensors(str(path / "model.safetensors"), flat, metadata={"format": "mlx"})


def _parameters(model: Module) -> dict[str, mx.array]:
    from mlx.utils import tree_flatten

    return dict(cast("list[tuple[str, mx.array]]", tree_flatten(model.parameters())))


def _init_weights(
    shapes: dict[str, tuple[int, ...]], *, seed: int, quiet_rows: Sequence[int], text_prefix: str
) -> dict[str, mx.array]:
    """Seeded weights, one PRNG key per parameter name (in sorted order)."""
    import mlx.core as mx

    names = sorted(shapes)
    keys = mx.random.split(mx.random.key(seed), len(names))
    weights: dict[str, mx.array] = {}
    for index, name in enumerate(names):
        shape = shapes[name]
        if name.endswith("bias"):
            weights[name] = mx.zeros(shape, dtype=mx.float32)
            continue
        if len(shape) == 1:  # RMSNorm and LayerNorm scales
            gain = _FINAL_NORM_GAIN if name == f"{text_prefix}model.norm.weight" else 1.0
            weights[name] = mx.full(shape, gain, dtype=mx.float32)
            continue
        noise = mx.random.normal(shape, dtype=mx.float32, key=keys[index])
        if name == f"{text_prefix}model.embed_tokens.weight":
            row_scale = mx.ones((shape[0], 1), dtype=mx.float32)
            row_scale[mx.array(list(quiet_rows))] = _QUIET_ROW_SCALE
            weights[name] = noise * _EMBED_STD * row_scale
            continue
        fan_in = 1
        for dim in shape[1:]:
            fan_in *= dim
        text_out = name.startswith(text_prefix) and name.endswith(
            ("o_proj.weight", "down_proj.weight")
        )
        gain = _OUT_PROJ_GAIN if text_out else 1.0
        weights[name] = noise * (gain / fan_in**0.5)
    return weights
