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

The weights are shaped like the text fixture's, so greedy decoding streams
plain ASCII text and practically never emits EOS: the embedding matrix has std
1 (tied, so it is also the output head), the output projections are scaled up,
and the rows of the special tokens and of non-printable byte tokens are shrunk
100-fold.

A build goes into a temporary sibling directory that is renamed into place
(see :mod:`bridge.demo_model`); ``ensure`` builds only when the stamp is
missing or stale, and ``build`` refuses to replace a directory without one.

Usage::

    python -m bridge.demo_vlm OUT_DIR [--seed N] [--force]
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import pathlib
import shutil
import sys
import tempfile
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final, cast

from .demo_model import STAMP_NAME

if TYPE_CHECKING:
    import mlx.core as mx
    from mlx.nn import Module
    from tokenizers import Tokenizer

__all__ = ["BUILDER", "BUILDER_VERSION", "build", "ensure", "main"]

BUILDER: Final = "demo_vlm"
BUILDER_VERSION: Final = 1
"""Bump whenever the output changes, so that ``ensure`` rebuilds old fixtures."""

EOS_TOKEN: Final = "<|im_end|>"
PAD_TOKEN: Final = "<|endoftext|>"
IMAGE_TOKEN: Final = "<|image_pad|>"
VIDEO_TOKEN: Final = "<|video_pad|>"
VISION_START: Final = "<|vision_start|>"
VISION_END: Final = "<|vision_end|>"
SPECIAL_TOKENS: Final = (
    PAD_TOKEN,
    "<|im_start|>",
    EOS_TOKEN,
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
_CORPUS_CHARS_PER_FILE: Final = 16_000

_EMBED_STD: Final = 1.0
_OUT_PROJ_GAIN: Final = 16.0
_FINAL_NORM_GAIN: Final = 3.0
_QUIET_ROW_SCALE: Final = 0.01

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
    if _is_current(target, seed):
        return target
    return _build(target, seed=seed, keep_current=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: build (or reuse) the model and write its path to stdout."""
    parser = argparse.ArgumentParser(
        prog="python -m bridge.demo_vlm",
        description="Build a tiny offline random-weight qwen2_vl model for mlx-vlm.",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="directory to write")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (0)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the stamp is current")
    args = parser.parse_args(argv)
    builder = build if args.force else ensure
    try:
        path = builder(args.out_dir, seed=args.seed)
    except FileExistsError as exc:
        parser.exit(1, f"{parser.prog}: error: {exc}\n")
    sys.stdout.write(f"{path}\n")
    return 0


# -- staging and installing ------------------------------------------------------------


def _stamp(seed: int) -> dict[str, Any]:
    return {"builder": BUILDER, "builder_version": BUILDER_VERSION, "seed": seed}


def _is_current(target: pathlib.Path, seed: int) -> bool:
    try:
        stamp = json.loads((target / STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(stamp == _stamp(seed))


def _build(target: pathlib.Path, *, seed: int, keep_current: bool) -> pathlib.Path:
    target = target.absolute()
    _check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    try:
        staging.chmod(0o755)
        _write_model(staging, seed)
        _install(staging, target, seed=seed, keep_current=keep_current)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _install(staging: pathlib.Path, target: pathlib.Path, *, seed: int, keep_current: bool) -> None:
    for _ in range(10):
        try:
            staging.rename(target)
            return
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                raise
        if keep_current and _is_current(target, seed):
            return
        _check_replaceable(target)
        retired = target.with_name(f".{target.name}.retired-{uuid.uuid4().hex}")
        try:
            target.rename(retired)
        except FileNotFoundError:
            continue
        shutil.rmtree(retired, ignore_errors=True)
    raise RuntimeError(f"could not install the demo vision model at {target}")


def _check_replaceable(target: pathlib.Path) -> None:
    if not target.exists() or (target / STAMP_NAME).is_file():
        return
    if target.is_dir() and not any(target.iterdir()):
        return
    raise FileExistsError(
        errno.EEXIST, "not a demo-model directory; refusing to replace", str(target)
    )


# -- the model ---------------------------------------------------------------------------


def _write_model(path: pathlib.Path, seed: int) -> None:
    import mlx.core as mx
    from mlx_vlm.utils import get_model_and_args, update_module_configs

    tokenizer = _train_tokenizer()
    tokenizer_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    ids = {token: _token_id(tokenizer, token) for token in SPECIAL_TOKENS}
    config = _model_config(vocab_size=-(-tokenizer_vocab // 64) * 64, ids=ids)

    with mx.stream(mx.cpu):
        arch, _ = get_model_and_args(config)
        # as mlx_vlm.utils.load_model does: from_dict fills text_config in place
        loading = {**json.loads(json.dumps(config)), "text_config": {}}
        model_config = arch.ModelConfig.from_dict(loading)
        model_config = update_module_configs(model_config, arch, loading, ["text", "vision"])
        model = arch.Model(model_config)
        shapes = {name: tuple(a.shape) for name, a in _parameters(model).items()}
        weights = _init_weights(
            shapes,
            seed=seed,
            quiet_rows=[
                *_quiet_token_ids(tokenizer),
                *range(tokenizer_vocab, config["vocab_size"]),
            ],
        )
        model.load_weights(list(weights.items()), strict=True)
        flat = _parameters(model)
        mx.eval(flat)
    mx.save_safetensors(str(path / "model.safetensors"), flat, metadata={"format": "mlx"})

    _write_json(path / "config.json", config)
    tokenizer.save(str(path / "tokenizer.json"))
    _write_json(path / "tokenizer_config.json", _tokenizer_config())
    _write_json(path / "chat_template.json", {"chat_template": _CHAT_TEMPLATE})
    _write_json(path / "preprocessor_config.json", _image_processor_config())
    _write_json(path / "video_preprocessor_config.json", _video_processor_config())
    _write_json(path / "processor_config.json", {"processor_class": "Qwen2VLProcessor"})
    _write_json(path / STAMP_NAME, _stamp(seed))


def _parameters(model: Module) -> dict[str, mx.array]:
    from mlx.utils import tree_flatten

    return dict(cast("list[tuple[str, mx.array]]", tree_flatten(model.parameters())))


def _init_weights(
    shapes: dict[str, tuple[int, ...]], *, seed: int, quiet_rows: Sequence[int]
) -> dict[str, mx.array]:
    """Seeded weights, one PRNG key per parameter name (in sorted order)."""
    import mlx.core as mx

    names = sorted(shapes)
    keys = mx.random.split(mx.random.key(seed), len(names))
    weights: dict[str, mx.array] = {}
    for index, name in enumerate(names):
        shape = shapes[name]
        if name.endswith("bias"):
            weights[name] = mx.zeros(shape, dtype=mx.float32)
            continue
        if len(shape) == 1:  # RMSNorm and LayerNorm scales
            gain = _FINAL_NORM_GAIN if name == "language_model.model.norm.weight" else 1.0
            weights[name] = mx.full(shape, gain, dtype=mx.float32)
            continue
        noise = mx.random.normal(shape, dtype=mx.float32, key=keys[index])
        if name.endswith("embed_tokens.weight"):
            row_scale = mx.ones((shape[0], 1), dtype=mx.float32)
            row_scale[mx.array(list(quiet_rows))] = _QUIET_ROW_SCALE
            weights[name] = noise * _EMBED_STD * row_scale
            continue
        fan_in = 1
        for dim in shape[1:]:
            fan_in *= dim
        text_out = name.startswith("language_model") and name.endswith(
            ("o_proj.weight", "down_proj.weight")
        )
        gain = _OUT_PROJ_GAIN if text_out else 1.0
        weights[name] = noise * (gain / fan_in**0.5)
    return weights


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


def _tokenizer_config() -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITIONS,
        "chat_template": _CHAT_TEMPLATE,
    }


def _train_tokenizer() -> Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    return tokenizer


def _corpus() -> list[str]:
    stdlib = pathlib.Path(os.__file__).parent
    texts = []
    for name in _CORPUS_MODULES:
        try:
            text = (stdlib / name).read_text(encoding="utf-8", errors="ignore")
        except OSError:
            continue
        texts.append(text[:_CORPUS_CHARS_PER_FILE])
    return texts


def _quiet_token_ids(tokenizer: Tokenizer) -> list[int]:
    quiet = []
    for token_id in range(tokenizer.get_vocab_size(with_added_tokens=True)):
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        printable = text.isascii() and all(c.isprintable() or c in "\t\n" for c in text)
        if not text or not printable or text in SPECIAL_TOKENS:
            quiet.append(token_id)
    return quiet


def _token_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise RuntimeError(f"tokenizer lacks {token!r}")
    return token_id


def _write_json(path: pathlib.Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
