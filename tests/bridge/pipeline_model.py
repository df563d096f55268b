"""A qwen2 copy of the tiny fixture, with the index that ``--shard pipeline`` needs.

mlx-lm pipelines models built on its ``PipelineMixin`` (qwen2, qwen3_moe,
deepseek, …), not qwen3, the fixture's architecture; and ``sharded_load``
finds each rank's layers through ``model.safetensors.index.json``. So this
writes the fixture's tokenizer and template beside a qwen2 config of the
same shape, seeded random weights, and an index naming the one file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bridge.demo.weights import write_weights

KEEP = ("tokenizer.json", "tokenizer_config.json")


def build_pipeline_model(tiny_model: Path, target: Path) -> Path:
    from mlx_lm.models import qwen2
    from safetensors import safe_open

    target.mkdir(parents=True, exist_ok=True)
    for name in KEEP:
        shutil.copy(tiny_model / name, target / name)
    base = json.loads((tiny_model / "config.json").read_text())
    config = {
        key: base[key]
        for key in (
            "hidden_size",
            "num_hidden_layers",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "rms_norm_eps",
            "vocab_size",
            "rope_theta",
            "max_position_embeddings",
            "tie_word_embeddings",
            "torch_dtype",
            "eos_token_id",
        )
    }
    config |= {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}
    (target / "config.json").write_text(json.dumps(config))
    write_weights(
        target, lambda: qwen2.Model(qwen2.ModelArgs.from_dict(config)), seed=1, quiet_rows=[0]
    )
    with safe_open(str(target / "model.safetensors"), framework="numpy") as f:
        names = list(f.keys())
    index = {"metadata": {}, "weight_map": {name: "model.safetensors" for name in names}}
    (target / "model.safetensors.index.json").write_text(json.dumps(index))
    return target
