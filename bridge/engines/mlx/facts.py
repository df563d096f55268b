"""Read a loaded mlx-lm model's architecture figures.

mlx-lm keeps them in ``model.args`` (not ``model.config``, which is why
go-mlx's bridge reports 0 layers); some families nest the text model's
figures under ``text_config``. Layer count comes from the module itself.

Every figure comes from the model directory, which is untrusted: a figure
that is not a non-negative integer below 2**63 reads as 0 (``context_len``:
null), and ``quantization`` is echoed only when it is plain JSON (strings,
finite numbers, 64-bit integers, shallow), so a reply can always be encoded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from protocol.fields import JsonValue
from protocol.replies import ModelFacts


def _arg(model: Any, config: Mapping[str, Any], *names: str) -> Any:
    sources: list[Any] = []
    args = getattr(model, "args", None)
    if args is not None:
        sources.append(args)
        text = getattr(args, "text_config", None)
        if text is not None:
            sources.append(text)
    sources.append(config)
    if isinstance(config.get("text_config"), Mapping):
        sources.append(config["text_config"])
    for source in sources:
        for name in names:
            value = source.get(name) if isinstance(source, Mapping) else getattr(source, name, None)
            if value is not None:
                return value
    return None


def _dtype_name(dtype: Any) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def model_facts(
    model: Any, config: Mapping[str, Any], *, path: str, context_len: int | None
) -> ModelFacts:
    from mlx.utils import tree_flatten

    layers = getattr(model, "layers", None)
    n_layers = (
        len(layers) if layers is not None else _count(_arg(model, config, "num_hidden_layers"))
    )
    hidden = _count(_arg(model, config, "hidden_size", "d_model", "dim"))
    heads = _count(_arg(model, config, "num_attention_heads", "n_heads"))
    kv_heads = _count(_arg(model, config, "num_key_value_heads", "n_kv_heads")) or heads
    head_dim = _count(_arg(model, config, "head_dim")) or (hidden // heads if heads else 0)
    quantization = _plain_json(config.get("quantization"))
    if not isinstance(quantization, dict) or not quantization:
        quantization = None
    bits = _count(quantization.get("bits")) if quantization else 0

    parameters = 0
    dtype = None
    for name, value in tree_flatten(model.parameters()):
        packed = bits and name.endswith("weight") and _dtype_name(value.dtype) == "uint32"
        parameters += value.size * (32 // bits) if packed else value.size
        if dtype is None and _dtype_name(value.dtype).startswith(("float", "bfloat")):
            if not name.endswith(("scales", "biases")):
                dtype = _dtype_name(value.dtype)
    if bits:
        parameters -= sum(
            v.size for n, v in tree_flatten(model.parameters()) if n.endswith(("scales", "biases"))
        )

    max_positions = _count(_arg(model, config, "max_position_embeddings", "max_seq_len"))
    model_type = _arg(model, config, "model_type") or getattr(model, "model_type", "unknown")
    return ModelFacts(
        path=path,
        model_type=model_type if isinstance(model_type, str) else "unknown",
        vocab_size=_count(_arg(model, config, "vocab_size")),
        layers=n_layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        context_len=_count(context_len) or max_positions or None,
        dtype=dtype or "unknown",
        quantization=quantization,
        parameters=_count(parameters),
    )


def _count(value: Any) -> int:
    """``value`` if it is an integer from 0 to 2**63 - 1, else 0."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63:
        return value
    return 0


def _plain_json(value: Any, depth: int = 0) -> JsonValue:
    """``value`` with whatever a reply cannot carry dropped: integers outside
    the 64-bit range, non-finite floats, non-JSON types, nesting past 8."""
    if depth > 8:
        return None
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**63 else None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _plain_json(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain_json(v, depth + 1) for v in value]
    return None
