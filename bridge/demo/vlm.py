"""Build a tiny, offline, random-weight vision model that real ``mlx_vlm.load`` accepts.

The vision tests need a model that goes through the same code path as a real
Qwen2-VL checkpoint (config, processor, chat template, image tokens, vision
tower) and answers in milliseconds on a CPU, with no network. This module
writes one, in the style of :mod:`bridge.demo_model`:

- ``config.json`` and ``model.safetensors``: mlx-vlm's ``qwen2_vl``
  architecture (a 2-layer text model with hidden size 64 and mRoPE, and a
  2-block vision tower of width 32 whose patch merger projects to 64), float32,
  tied embeddings, seeded random weights, about 0.3M parameters;
- ``tokenizer.json`` and ``tokenizer_config.json``: a 1024-token byte-level BPE
  trained on Python standard-library sources, with the ChatML specials and the
  Qwen2-VL vision specials ``<|vision_start|>``, ``<|vision_end|>``,
  ``<|image_pad|>`` and ``<|video_pad|>``;
- ``chat_template.json``: a Qwen2-VL-like template that renders each image
  content part as ``<|vision_start|><|image_pad|><|vision_end|>``;
- ``preprocessor_config.json`` (patch 14, merge 2, temporal patch 2, at most
  112×112 pixels, so one image is at most 16 image tokens),
  ``video_preprocessor_config.json`` and ``processor_config.json``: without
  the last two, ``mlx_vlm.load`` would try ``hf_hub_download`` for them;
- ``.mlx_bridge_fixture``: a stamp, written last, naming the builder, its
  version and the seed.

The weights are shaped like the text fixture's (:mod:`bridge.demo.weights`), so
greedy decoding streams plain ASCII text and practically never emits EOS: the
embedding matrix has std 1 (tied, so it is also the output head), the output
projections are scaled up, and the rows of the special tokens and of
non-printable byte tokens are shrunk 100-fold.

A build goes into a temporary sibling directory that is renamed into place
(see :mod:`bridge.demo.files`); ``ensure`` builds only when the stamp is
missing or stale, and ``build`` refuses to replace a directory without one.

Usage::

    python -m bridge.demo.vlm OUT_DIR [--seed N] [--force]
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final, cast

from bridge.demo import files as demo_files
from bridge.demo.tokenizer import (
    CHATML_SPECIALS,
    EOS_TOKEN,
    PAD_TOKEN,
    quiet_token_ids,
    token_id,
    tokenizer_config,
    train_tokenizer,
)
from bridge.demo.weights import padded_vocab_size, write_weights

if TYPE_CHECKING:
    from mlx.nn import Module

__all__ = ["BUILDER", "BUILDER_VERSION", "build", "ensure", "main"]

BUILDER: Final = "demo_vlm"
BUILDER_VERSION: Final = 1
"""Bump whenever the output changes, so that ``ensure`` rebuilds old fixtures."""

IMAGE_TOKEN: Final = "<|image_pad|>"
VIDEO_TOKEN: Final = "<|video_pad|>"
VISION_START: Final = "<|vision_start|>"
VISION_END: Final = "<|vision_end|>"
SPECIAL_TOKENS: Final = (
    *CHATML_SPECIALS,
    VISION_START,
    VISION_END,
    IMAGE_TOKEN,
    VIDEO_TOKEN,
)

TOKENIZER_VOCAB_SIZE: Final = 1024
MAX_POSITIONS: Final = 4096
PATCH_SIZE: Final = 14
MERGE_SIZE: Final = 2
TEMPORAL_PATCH_SIZE: Final = 2
MIN_PIXELS: Final = 56 * 56
MAX_PIXELS: Final = 112 * 112

_CORPUS_MODULES: Final = (
    "argparse.py",
    "base64.py",
    "contextlib.py",
    "dataclasses.py",
    "functools.py",
    "heapq.py",
    "random.py",
    "shlex.py",
    "string.py",
    "textwrap.py",
)

_CLIP_MEAN: Final = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD: Final = (0.26862954, 0.26130258, 0.27577711)

_CHAT_TEMPLATE: Final = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- elif message['content'] is not none -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] in ('image', 'image_url') or 'image' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def build(out_dir: str | os.PathLike[str], *, seed: int = 0) -> pathlib.Path:
    """Build the model into ``out_dir``, replacing any earlier fixture there.

    Returns the absolute path. Raises ``FileExistsError`` if ``out_dir`` is a
    non-empty directory (or a file) that no fixture builder wrote.
    """
    return _build(pathlib.Path(out_dir), seed=seed, keep_current=False)


def ensure(out_dir: str | os.PathLike[str], *, seed: int = 0) -> pathlib.Path:
    """Return ``out_dir``'s absolute path, building it first unless it is current."""
    target = pathlib.Path(out_dir).absolute()
    if demo_files.is_current(target, _stamp(seed)):
        return target
    return _build(target, seed=seed, keep_current=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: build (or reuse) the model and write its path to stdout."""
    return demo_files.command_line(
        argv,
        prog="python -m bridge.demo.vlm",
        description="Build a tiny offline random-weight qwen2_vl model for mlx-vlm.",
        build=build,
        ensure=ensure,
    )


# -- stamp and build -------------------------------------------------------------------


def _stamp(seed: int) -> dict[str, Any]:
    return {"builder": BUILDER, "builder_version": BUILDER_VERSION, "seed": seed}


def _build(target: pathlib.Path, *, seed: int, keep_current: bool) -> pathlib.Path:
    return demo_files.build(
        target,
        stamp=_stamp(seed),
        write=functools.partial(_write_model, seed=seed),
        keep_current=keep_current,
        what="demo vision model",
    )


# -- the model ---------------------------------------------------------------------------


def _write_model(path: pathlib.Path, *, seed: int) -> None:
    from mlx_vlm.utils import get_model_and_args, update_module_configs

    tokenizer = train_tokenizer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        corpus_modules=_CORPUS_MODULES,
    )
    tokenizer_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    ids = {token: token_id(tokenizer, token) for token in SPECIAL_TOKENS}
    config = _model_config(vocab_size=padded_vocab_size(tokenizer_vocab), ids=ids)

    def make_model() -> Module:
        arch, _ = get_model_and_args(config)
        # as mlx_vlm.utils.load_model does: from_dict fills text_config in place
        loading = {**json.loads(json.dumps(config)), "text_config": {}}
        model_config = arch.ModelConfig.from_dict(loading)
        model_config = update_module_configs(model_config, arch, loading, ["text", "vision"])
        return cast("Module", arch.Model(model_config))

    write_weights(
        path,
        make_model,
        seed=seed,
        quiet_rows=[
            *quiet_token_ids(tokenizer, SPECIAL_TOKENS),
            *range(tokenizer_vocab, config["vocab_size"]),
        ],
        text_prefix="language_model.",
    )

    demo_files.write_json(path / "config.json", config)
    tokenizer.save(str(path / "tokenizer.json"))
    demo_files.write_json(
        path / "tokenizer_config.json",
        tokenizer_config(chat_template=_CHAT_TEMPLATE, model_max_length=MAX_POSITIONS),
    )
    demo_files.write_json(path / "chat_template.json", {"chat_template": _CHAT_TEMPLATE})
    demo_files.write_json(path / "preprocessor_config.json", _image_processor_config())
    demo_files.write_json(path / "video_preprocessor_config.json", _video_processor_config())
    demo_files.write_json(path / "processor_config.json", {"processor_class": "Qwen2VLProcessor"})


def _model_config(*, vocab_size: int, ids: dict[str, int]) -> dict[str, Any]:
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        # mRoPE splits head_dim/2 = 8 rotary frequencies over (time, height, width)
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "max_position_embeddings": MAX_POSITIONS,
        "vocab_size": vocab_size,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "bos_token_id": None,
        "eos_token_id": [ids[EOS_TOKEN], ids[PAD_TOKEN]],
        "image_token_id": ids[IMAGE_TOKEN],
        "video_token_id": ids[VIDEO_TOKEN],
        "vision_start_token_id": ids[VISION_START],
        "vision_end_token_id": ids[VISION_END],
        "vision_config": {
            "model_type": "qwen2_vl",
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 64,
            "num_heads": 2,
            "mlp_ratio": 2,  # transformers 5 requires an int here
            "in_channels": 3,
            "in_chans": 3,
            "patch_size": PATCH_SIZE,
            "spatial_patch_size": PATCH_SIZE,
            "spatial_merge_size": MERGE_SIZE,
            "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        },
    }


def _image_processor_config() -> dict[str, Any]:
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": list(_CLIP_MEAN),
        "image_std": list(_CLIP_STD),
        "patch_size": PATCH_SIZE,
        "merge_size": MERGE_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "min_pixels": MIN_PIXELS,
        "max_pixels": MAX_PIXELS,
        "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
    }


def _video_processor_config() -> dict[str, Any]:
    return {
        **_image_processor_config(),
        "video_processor_type": "Qwen2VLVideoProcessor",
        "image_processor_type": None,
    }


if __name__ == "__main__":
    sys.exit(main())
