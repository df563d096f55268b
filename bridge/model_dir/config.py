"""Check a model's ``config.json`` against its weights, before a loader builds it.

mlx-lm and mlx-vlm build the model from ``config.json`` first and load the
weights into it afterwards, so a config that lies makes the build itself run
away: ``num_hidden_layers: 1000000000`` builds a billion layer objects (3 GB
in 12 s, with no reply and no cancel). So before any loader runs:

- the architecture figures (``hidden_size``, heads, ``head_dim``,
  ``vocab_size``, layer counts) must be positive integers below generous
  bounds, and no integer anywhere in the config may be outside the signed
  64-bit range (``max_position_embeddings: 10**30`` cannot be echoed in a
  reply);
- the text model's layer count may not exceed the layers the weights hold
  (the largest ``N`` in ``model.layers.N.``-style names, plus one; weights
  may hold more, such as DeepSeek's multi-token-prediction layer), and the
  same for a vision encoder's ``depth`` against its ``vision…blocks.N.``
  names;
- ``hidden_size`` must match the embedding matrix, and ``vocab_size`` may not
  exceed its rows.

A mismatch is ``load_failed`` naming the config key and what the weights
hold. :func:`kv_cache_bytes` estimates the KV cache a context length implies,
for the memory gate.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TypeGuard

from bridge.model_dir.safetensors_header import DTYPE_BYTES, FLOAT_DTYPES, Tensor, Weights
from protocol.errors import LoadFailed

# Sections of a config that describe the text model (besides the top level).
TEXT_SECTIONS = ("text_config", "llm_config", "language_config")
VISION_SECTIONS = ("vision_config",)

LAYER_KEYS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "decoder_layers")
VISION_LAYER_KEYS = ("depth", "num_hidden_layers", "num_layers")

# Upper bounds for architecture figures: far above any real model, far below
# what makes the build (or MLX's 32-bit shapes) misbehave.
BOUNDS = {
    "hidden_size": 2**20,
    "num_attention_heads": 2**14,
    "num_key_value_heads": 2**14,
    "head_dim": 2**16,
    "vocab_size": 2**26,
    "intermediate_size": 2**24,
}
# Layers allowed when the weights' names show no layer index we recognise.
MAX_UNCHECKED_LAYERS = 4096

# Where a layer index sits in a tensor name: ``<prefix>layers.N.``,
# ``<prefix>h.N.`` (GPT-2 style), ``<prefix>blocks.N.``.
_LAYER_NAME = re.compile(r"^(?P<prefix>(?:[^.]+\.)*?)(?:layers|h|blocks)\.(?P<index>\d+)\.")
_VISION_WORDS = ("vision", "visual", "vit", "image", "img", "siglip", "clip")
_OTHER_TOWERS = ("audio", "speech", "sound", "projector", "mm_")

_EMBEDDINGS = (
    "embed_tokens.weight",
    "wte.weight",
    "tok_embeddings.weight",
    "word_embeddings.weight",
)

INT64_MAX = 2**63 - 1


@dataclass(frozen=True, slots=True)
class _Layers:
    count: int
    example: str  # the prefix, e.g. "model.layers"


def check_config(config: Mapping[str, object], weights: Weights) -> None:
    _check_integers(config)
    text_layers = _layer_count(weights, vision=False, width=_width(text_figures(config)))
    vision = config.get("vision_config")
    vision_width = _width(vision) if isinstance(vision, Mapping) else None
    vision_layers = _layer_count(weights, vision=True, width=vision_width)
    for prefix, section in _sections(config, TEXT_SECTIONS):
        for key, bound in BOUNDS.items():
            _check_figure(section, key, prefix, bound)
        for key in LAYER_KEYS:
            _check_layers(section, key, prefix, text_layers)
    for prefix, section in _sections(config, VISION_SECTIONS, top=False):
        for key in VISION_LAYER_KEYS:
            _check_layers(section, key, prefix, vision_layers)
    _check_embedding(config, weights)


def text_figures(config: Mapping[str, object]) -> Mapping[str, object]:
    """The section of ``config`` that describes the text model."""
    for name in TEXT_SECTIONS:
        section = config.get(name)
        if isinstance(section, Mapping) and section:
            return section
    return config


def kv_cache_bytes(config: Mapping[str, object], weights: Weights, tokens: int) -> int:
    """Bytes of the KV cache of ``tokens`` tokens: layers × KV heads × head
    dim × 2 (keys and values) × the activations' dtype bytes × tokens.
    Sliding-window layers count their window, linear-attention and recurrent
    layers nothing, multi-head latent attention its latent width. 0 when the
    config lacks the figures."""
    text = text_figures(config)
    layers = _first_int(text, LAYER_KEYS) or _first_int(config, LAYER_KEYS)
    heads = _first_int(text, ("num_attention_heads", "n_heads", "n_head"))
    if not layers or not heads:
        return 0
    kv_heads = _first_int(text, ("num_key_value_heads", "n_kv_heads", "num_kv_heads")) or heads
    hidden = _first_int(text, ("hidden_size", "d_model", "dim", "n_embd")) or 0
    head_dim = _first_int(text, ("head_dim",)) or hidden // heads
    latent = _first_int(text, ("kv_lora_rank",))
    if latent:  # MLA caches the latent and the rope part, shared by all heads
        per_token = latent + (_first_int(text, ("qk_rope_head_dim",)) or 64)
    else:
        per_token = 2 * kv_heads * head_dim
    window = _first_int(text, ("sliding_window",))
    layer_tokens = 0
    types = text.get("layer_types")
    if isinstance(types, list) and len(types) == layers:
        for kind in types:
            if kind in ("sliding_attention", "chunked_attention") and window:
                layer_tokens += min(tokens, window)
            elif isinstance(kind, str) and ("linear" in kind or kind in ("mamba", "conv")):
                continue  # a constant-size state
            else:
                layer_tokens += tokens
    elif window and _first_int(text, ("sliding_window_pattern",)):
        pattern = _first_int(text, ("sliding_window_pattern",)) or 1  # Gemma 3: 5 of 6 slide
        full = layers // pattern
        layer_tokens = full * tokens + (layers - full) * min(tokens, window)
    else:
        layer_tokens = layers * tokens
    return layer_tokens * per_token * _activation_bytes(weights)


def _activation_bytes(weights: Weights) -> int:
    """Bytes per element of the dtype activations (and so the KV cache) will
    have: the float dtype that holds the most elements (for a quantized model,
    its scales' and norms' dtype)."""
    counts: dict[str, int] = {}
    for tensor in weights.tensors.values():
        if tensor.dtype in FLOAT_DTYPES:
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.size
    if not counts:
        return 2
    return DTYPE_BYTES[max(counts, key=lambda d: counts[d])]


# -- checks -----------------------------------------------------------------------------


def _sections(
    config: Mapping[str, object], names: tuple[str, ...], *, top: bool = True
) -> Iterator[tuple[str, Mapping[str, object]]]:
    if top:
        yield "", config
    for name in names:
        section = config.get(name)
        if isinstance(section, Mapping):
            yield f"{name}.", section


def _check_integers(config: Mapping[str, object]) -> None:
    stack: list[tuple[str, object]] = [("", config)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, Mapping):
            stack.extend((f"{where}{k}.", v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((f"{where}{i}.", v) for i, v in enumerate(value))
        elif isinstance(value, int) and not -INT64_MAX - 1 <= value <= INT64_MAX:
            raise LoadFailed(
                f"config.json: {where.rstrip('.')} is {_short(value)}, outside the 64-bit "
                "integer range"
            )


def _check_figure(section: Mapping[str, object], key: str, prefix: str, bound: int) -> None:
    if key not in section or section[key] is None:
        return
    value = section[key]
    if not _is_int(value) or not 1 <= value <= bound:
        raise LoadFailed(
            f"config.json: {prefix}{key} must be an integer from 1 to {bound}, got {_short(value)}"
        )


def _check_layers(
    section: Mapping[str, object], key: str, prefix: str, held: _Layers | None
) -> None:
    if key not in section or section[key] is None:
        return
    value = section[key]
    if not _is_int(value) or value < 0:
        raise LoadFailed(f"config.json: {prefix}{key} must be an integer ≥ 0, got {_short(value)}")
    if held is None:
        if value > MAX_UNCHECKED_LAYERS:
            raise LoadFailed(
                f"config.json: {prefix}{key} is {value}, over {MAX_UNCHECKED_LAYERS}, and the "
                "weights' tensor names show no layer count to check it against"
            )
        return
    if value > held.count:
        raise LoadFailed(
            f"config.json: {prefix}{key} is {value}, but the weights hold {held.count} "
            f"layers ({held.example}.0 to {held.example}.{held.count - 1})"
        )


def _check_embedding(config: Mapping[str, object], weights: Weights) -> None:
    found = _embedding(weights)
    if found is None:
        return
    name, tensor = found
    if len(tensor.shape) != 2:
        return
    rows, width = tensor.shape
    prefix, text = next(
        ((f"{n}.", s) for n in TEXT_SECTIONS if isinstance(s := config.get(n), Mapping) and s),
        ("", config),
    )
    hidden = _hidden_width(config, name, tensor)
    if hidden is not None:
        expected = text.get("hidden_size")
        if _is_int(expected) and expected != hidden:
            raise LoadFailed(
                f"config.json: {prefix}hidden_size is {expected}, but the weights' {name} "
                f"is {rows} × {width}" + ("" if hidden == width else f" ({hidden} unpacked)")
            )
    vocab = text.get("vocab_size")
    if _is_int(vocab) and vocab > rows:
        raise LoadFailed(
            f"config.json: {prefix}vocab_size is {vocab}, but the weights' {name} has {rows} rows"
        )


def _embedding(weights: Weights) -> tuple[str, Tensor] | None:
    for name, tensor in weights.tensors.items():
        if name.endswith(_EMBEDDINGS) and not _tower(name):
            if name.count(".") <= 3:
                return name, tensor
    return None


def _hidden_width(config: Mapping[str, object], name: str, tensor: Tensor) -> int | None:
    """The embedding width, unpacking a quantized matrix (32 / bits values
    per uint32); None when the packing is not known."""
    width = tensor.shape[1]
    if tensor.dtype in FLOAT_DTYPES:
        return width
    if tensor.dtype != "U32":
        return None
    quantization = config.get("quantization")
    if not isinstance(quantization, Mapping):
        return None
    own = quantization.get(name.removesuffix(".weight"))
    bits = own.get("bits") if isinstance(own, Mapping) else quantization.get("bits")
    if not _is_int(bits) or not 1 <= bits <= 16 or (width * 32) % bits:
        return None
    return width * 32 // bits


def _layer_count(weights: Weights, *, vision: bool, width: int | None) -> _Layers | None:
    """The most layers any tower of the wanted kind really holds: layers
    0, 1, 2, … without a gap, each with at least :func:`_min_layer_values`
    values (so one empty tensor named ``layers.999999`` proves nothing)."""
    held: dict[str, dict[int, int]] = {}  # stem -> layer index -> values
    for name, tensor in weights.tensors.items():
        match = _LAYER_NAME.match(name)
        if match is None:
            continue
        tower = _tower(match["prefix"])
        if (tower == "vision") != vision or tower == "other":
            continue
        stem = name[: match.end("index") - len(match["index"]) - 1]
        layers = held.setdefault(stem, {})
        index = int(match["index"])
        layers[index] = layers.get(index, 0) + _values(tensor)
    best: _Layers | None = None
    least = _min_layer_values(width)
    for stem, layers in held.items():
        count = 0
        while layers.get(count, 0) >= least:
            count += 1
        if best is None or count > best.count:
            best = _Layers(count=count, example=stem)
    return best


def _min_layer_values(width: int | None) -> int:
    """The fewest weight values a layer of a model ``width`` wide can hold:
    at least its query and output projections (2 × width²), quantized to as
    little as 2 bits (16 values in one uint32 element)."""
    return max(1, (2 * width * width) // 16) if width else 1


def _values(tensor: Tensor) -> int:
    """The values a tensor holds, counting a packed uint32 element as 1 (the
    fewest it can stand for: the check stays a lower bound)."""
    return tensor.size


def _width(section: Mapping[str, object]) -> int | None:
    return _first_int(section, ("hidden_size", "d_model", "n_embd", "dim", "embed_dim"))


def _tower(name: str) -> str | None:
    lowered = name.lower()
    if any(word in lowered for word in _OTHER_TOWERS):
        return "other"
    if any(word in lowered for word in _VISION_WORDS):
        return "vision"
    return None


def _first_int(section: Mapping[str, object], keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = section.get(key)
        if _is_int(value) and value > 0:
            return value
    return None


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: object) -> str:
    text = repr(value)
    if isinstance(value, int) and abs(value) >= 10**18:
        text = f"about 10^{len(str(abs(value))) - 1}"
    return text if len(text) <= 40 else text[:37] + "..."
