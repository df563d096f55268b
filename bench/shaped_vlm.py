"""Build a random-weight vision model with Qwen2-VL-2B's shape, for timing.

The tokenizer, processor files and chat template come from the offline
vision fixture (``bridge.demo.vlm``); embedding rows past its vocabulary are
zeroed so they are never sampled. Build it where it runs (the weights are
too big to carry to the GPU machine):

    python bench/shaped_vlm.py OUT_DIR [--dtype bfloat16] [--layers N] [--vision-depth N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from shaped_model import save_random  # this folder, run as a script

# Qwen2-VL-2B-Instruct's config.json (text and vision towers); the vocabulary
# stays the fixture's.
TEXT = {
    "hidden_size": 1536,
    "num_hidden_layers": 28,
    "intermediate_size": 8960,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
}
VISION = {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16, "mlp_ratio": 4}


def build(out: Path, *, dtype: str, layers: int | None, vision_depth: int | None) -> Path:
    import mlx.core as mx
    from mlx_vlm.utils import get_model_and_args, update_module_configs

    from bridge.demo import vlm

    with tempfile.TemporaryDirectory() as tmp:
        tiny = vlm.build(Path(tmp) / "tiny")
        out.mkdir(parents=True, exist_ok=True)
        for f in tiny.iterdir():
            if f.name not in ("model.safetensors", "config.json") and f.is_file():
                shutil.copy(f, out / f.name)
        config: dict[str, Any] = json.loads((tiny / "config.json").read_text())
    known_vocab = vlm.TOKENIZER_VOCAB_SIZE + len(vlm.SPECIAL_TOKENS)
    config.update(TEXT, torch_dtype=dtype)
    config["num_hidden_layers"] = layers or TEXT["num_hidden_layers"]
    config["vision_config"] = {**config["vision_config"], **VISION}
    config["vision_config"]["depth"] = vision_depth or VISION["depth"]
    arch, _ = get_model_and_args(config)
    loading = {**json.loads(json.dumps(config)), "text_config": {}}
    model_config = update_module_configs(
        arch.ModelConfig.from_dict(loading), arch, loading, ["text", "vision"]
    )
    mx.random.seed(0)
    model = arch.Model(model_config)
    text = model.language_model.model
    save_random(model, text, known_vocab=known_vocab, dtype=dtype, out=out, config=config)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out", type=Path)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--layers", type=int, default=None, help="default: the shape's")
    p.add_argument("--vision-depth", type=int, default=None, help="default: the shape's")
    args = p.parse_args()
    built = build(args.out, dtype=args.dtype, layers=args.layers, vision_depth=args.vision_depth)
    sys.stdout.write(f"{built}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
