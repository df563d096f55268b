"""Build a random-weight model with a real model's shape (Qwen3-0.6B or -4B), for timing.

The tokenizer and chat template come from the offline demo model; embedding
rows past its vocabulary are zeroed so they are never sampled. Build it where
it runs (the weights are too big to carry to the GPU machine):

    python bench/shaped_model.py OUT_DIR [--shape qwen3-0.6b|qwen3-4b] [--dtype bfloat16]
        [--layers N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

QWEN3_0_6B = {
    "model_type": "qwen3",
    "hidden_size": 1024,
    "num_hidden_layers": 28,
    "intermediate_size": 3072,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rms_norm_eps": 1e-6,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
}
# Qwen3-4B's shape (its config.json); the vocabulary stays the demo tokenizer's, as above.
QWEN3_4B = {
    **QWEN3_0_6B,
    "hidden_size": 2560,
    "num_hidden_layers": 36,
    "intermediate_size": 9728,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "tie_word_embeddings": True,
}
SHAPES = {"qwen3-0.6b": QWEN3_0_6B, "qwen3-4b": QWEN3_4B}


def build(out: Path, *, dtype: str, layers: int | None = None, shape: str = "qwen3-0.6b") -> Path:
    import mlx.core as mx
    from mlx_lm.models import qwen3

    from bridge import demo_model

    with tempfile.TemporaryDirectory() as tmp:
        tiny = demo_model.build(Path(tmp) / "tiny")
        out.mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tiny / name, out / name)
        tiny_config = json.loads((tiny / "config.json").read_text())
    known_vocab = int(tiny_config["vocab_size"])
    base = SHAPES[shape]
    config = {
        **base,
        "num_hidden_layers": layers or base["num_hidden_layers"],
        "torch_dtype": dtype,
    }
    config["eos_token_id"] = tiny_config["eos_token_id"]
    mx.random.seed(0)
    model = qwen3.Model(qwen3.ModelArgs.from_dict(config))
    save_random(model, model.model, known_vocab=known_vocab, dtype=dtype, out=out, config=config)
    return out


def save_random(
    model: Any, text: Any, *, known_vocab: int, dtype: str, out: Path, config: dict[str, Any]
) -> None:
    """Write ``model`` (freshly built, so random) to ``out`` with ``config``:
    its matrices scaled down, everything cast to ``dtype``, and the embedding
    rows of ``text`` (the module holding ``embed_tokens``) past the
    tokenizer's ``known_vocab`` zeroed, the others scaled up, so that greedy
    choices are decisive and never land on a token the tokenizer lacks."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map

    model.update(
        tree_map(
            lambda p: (p * 0.02 if p.ndim > 1 else p).astype(getattr(mx, dtype)), model.parameters()
        )
    )
    embed = text.embed_tokens.weight
    keep = (mx.arange(embed.shape[0]) < known_vocab)[:, None]
    text.embed_tokens.weight = mx.where(keep, embed * 50, mx.zeros_like(embed))
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out", type=Path)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=None, help="default: the shape's")
    args = p.parse_args()
    built = build(args.out, dtype=args.dtype, layers=args.layers, shape=args.shape)
    sys.stdout.write(f"{built}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
