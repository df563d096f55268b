"""Read a loaded mlx-lm model's architecture figures.

mlx-lm keeps them in ``model.args`` (not ``model.config``, which is why
go-mlx's bridge reports 0 layers); some families nest the text model's
figures under ``text_config``. Layer count comes from the module itself.
"""

from __future__ import annotations

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
        len(layers) if layers is not None else int(_arg(model, config, "num_hidden_layers") or 0)
    )
    hidden = int(_arg(model, config, "hidden_size", "d_model", "dim") or 0)
    heads = int(_arg(model, config, "num_attention_heads", "n_heads") or 0)
    kv_heads = int(_arg(model, config, "num_key_value_heads", "n_kv_heads") or heads)
    head_dim = int(_arg(model, config, "head_dim") or (hidden // heads if heads else 0))
    quantization: Mapping[str, JsonValue] | None = config.get("quantization")
    bits = int(quantization.get("bits", 0)) if quantization else 0  # type: ignore[arg-type]

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

    max_positions = _arg(model, config, "max_position_embeddings", "max_seq_len")
    return ModelFacts(
        path=path,
        model_type=str(
            _arg(model, config, "model_type") or getattr(model, "model_type", "unknown")
        ),
        vocab_size=int(_arg(model, config, "vocab_size") or 0),
        layers=n_layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        context_len=context_len or (int(max_positions) if max_positions else None),
        dtype=dtype or "unknown",
        quantization=dict(quantization) if quantization else None,
        parameters=int(parameters),
    )
