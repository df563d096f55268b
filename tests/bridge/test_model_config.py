"""``config.json`` against the weights, and the KV cache the memory gate counts.

Pure functions over a parsed config and a header summary, on the layouts of
real model families (names and figures as their checkpoints have them).
"""

from __future__ import annotations

from typing import Any

import pytest

from bridge.model_dir.config import check_config, kv_cache_bytes
from bridge.model_dir.safetensors_header import Tensor, Weights
from protocol.errors import LoadFailed


def weights(shapes: dict[str, tuple[str, tuple[int, ...]]]) -> Weights:
    tensors = {
        name: Tensor(dtype=d, shape=s, file="model.safetensors") for name, (d, s) in shapes.items()
    }
    return Weights(tensors=tensors, total_bytes=0)


def layers(
    prefix: str, n: int, dtype: str = "BF16", width: int = 4096
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``n`` layers of a model ``width`` wide, each with its q and o projections."""
    return {
        f"{prefix}.{i}.self_attn.{proj}.weight": (dtype, (width, width))
        for i in range(n)
        for proj in ("q_proj", "o_proj")
    }


LLAMA: dict[str, Any] = {
    "num_hidden_layers": 32,
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
}
LLAMA_WEIGHTS = weights(
    {"model.embed_tokens.weight": ("BF16", (128256, 4096)), **layers("model.layers", 32)}
)


@pytest.mark.parametrize(
    ("shapes", "held"),
    [
        # tiny tensors under every index: a layer of a 4096-wide model holds more
        ({f"model.layers.{i}.x": ("BF16", (8, 8)) for i in range(32)}, 0),
        # a gap: layers 0..9, then 11..31
        ({n: v for n, v in layers("model.layers", 32).items() if ".10." not in n}, 10),
    ],
)
def test_layers_count_from_0_without_a_gap_and_with_real_weights(
    shapes: dict[str, tuple[str, tuple[int, ...]]], held: int
) -> None:
    lying = weights({"model.embed_tokens.weight": ("BF16", (128256, 4096)), **shapes})
    with pytest.raises(LoadFailed, match=f"num_hidden_layers is 32, but the weights hold {held} "):
        check_config(LLAMA, lying)


def test_a_consistent_config_passes_and_counts_its_kv_cache() -> None:
    check_config(LLAMA, LLAMA_WEIGHTS)
    # 32 layers × 8 KV heads × 128 × 2 (K and V) × 2 bytes (bf16) per token
    assert kv_cache_bytes(LLAMA, LLAMA_WEIGHTS, 1000) == 32 * 8 * 128 * 2 * 2 * 1000


def test_weights_may_hold_more_layers_than_the_config() -> None:
    """DeepSeek V3 ships its multi-token-prediction layer as model.layers.61."""
    check_config({**LLAMA, "num_hidden_layers": 31}, LLAMA_WEIGHTS)


def test_a_quantized_embedding_is_unpacked_for_the_hidden_size_check() -> None:
    q = weights({"model.embed_tokens.weight": ("U32", (128256, 512)), **layers("model.layers", 32)})
    check_config({**LLAMA, "quantization": {"group_size": 64, "bits": 4}}, q)
    with pytest.raises(LoadFailed, match=r"hidden_size is 4096, .* 128256 × 512 \(2048 unpacked\)"):
        check_config({**LLAMA, "quantization": {"group_size": 64, "bits": 8}}, q)


def test_a_vision_model_checks_its_text_and_vision_layers_apart() -> None:
    config = {
        "text_config": {"num_hidden_layers": 4, "hidden_size": 16, "vocab_size": 100},
        "vision_config": {"num_hidden_layers": 3},
    }
    w = weights(
        {
            "language_model.model.embed_tokens.weight": ("F16", (100, 16)),
            **layers("language_model.model.layers", 4),
            **layers("vision_tower.vision_model.encoder.layers", 3),
            **layers("multi_modal_projector.layers", 9),
        }
    )
    check_config(config, w)
    with pytest.raises(
        LoadFailed, match="text_config.num_hidden_layers is 5, but the weights hold 4"
    ):
        check_config(
            {**config, "text_config": {**config["text_config"], "num_hidden_layers": 5}}, w
        )
    with pytest.raises(LoadFailed, match="vision_config.num_hidden_layers is 4, but .* hold 3"):
        check_config({**config, "vision_config": {"num_hidden_layers": 4}}, w)


def test_without_recognised_layer_names_a_layer_count_is_still_bounded() -> None:
    w = weights({"backbone.mixer_stack.0.w": ("F32", (2, 2))})
    check_config({"num_hidden_layers": 64}, w)
    with pytest.raises(LoadFailed, match="num_hidden_layers is 100000, over 4096"):
        check_config({"num_hidden_layers": 100_000}, w)


def test_integers_beyond_64_bits_anywhere_are_refused() -> None:
    with pytest.raises(LoadFailed, match=r"rope_scaling.factors.1 is about 10\^20"):
        check_config({"rope_scaling": {"factors": [1, 10**20]}}, LLAMA_WEIGHTS)


def test_sliding_window_linear_attention_and_mla_kv_caches() -> None:
    gemma = {**LLAMA, "num_hidden_layers": 6, "sliding_window": 512, "sliding_window_pattern": 6}
    assert kv_cache_bytes(gemma, LLAMA_WEIGHTS, 4096) == (4096 + 5 * 512) * 8 * 128 * 2 * 2
    hybrid = {
        **LLAMA,
        "num_hidden_layers": 4,
        "layer_types": ["linear_attention"] * 3 + ["full_attention"],
    }
    assert kv_cache_bytes(hybrid, LLAMA_WEIGHTS, 100) == 100 * 8 * 128 * 2 * 2
    mla = {**LLAMA, "num_hidden_layers": 2, "kv_lora_rank": 512, "qk_rope_head_dim": 64}
    assert kv_cache_bytes(mla, LLAMA_WEIGHTS, 10) == 2 * 10 * (512 + 64) * 2
    assert kv_cache_bytes({"model_type": "unknown"}, LLAMA_WEIGHTS, 10) == 0
