"""A raw prompt's token ids, the same for ``generate`` and ``inspect`` on every engine.

The tokenizer's special tokens (BOS) are added unless the prompt already
starts with the BOS text, so that a host that renders its own template with
BOS gets it once, not twice. No MLX here: it only calls the tokenizer.
"""

from __future__ import annotations

from typing import Any


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    bos = getattr(tokenizer, "bos_token", None)
    add_special = bos is None or not prompt.startswith(bos)
    return list(tokenizer.encode(prompt, add_special_tokens=add_special))
