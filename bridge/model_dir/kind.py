"""Tell a vision model from a text model by its ``config.json``, before loading.

No MLX here, and no import of mlx-vlm: this runs on every ``load`` and must
work (and say something useful) when mlx-vlm is not installed. The config is
read by :func:`bridge.model_dir.files.read_config`, with its size and nesting
bounds.

A model is a vision model when its config describes a vision encoder: a
non-empty ``vision_config`` (Qwen2-VL, Gemma 3, LLaVA, Idefics, PaliGemma,
Mistral 3, …) or one of the older spellings below. A ``model_type`` alone
says nothing: mlx-vlm also ships text-only families (``qwen3``, ``llama``),
and a text-only conversion of a vision family (``gemma3_text``) has no
vision encoder.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

# Keys whose (non-empty) presence means a vision encoder.
VISION_KEYS = ("vision_config", "vision_tower_config", "visual", "mm_vision_tower")


class ModelKind(enum.Enum):
    TEXT = "text"
    VISION = "vision"


def model_kind(config: Mapping[str, object]) -> ModelKind:
    if any(config.get(key) for key in VISION_KEYS):
        return ModelKind.VISION
    return ModelKind.TEXT
