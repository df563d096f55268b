"""Command-line options of the vision engine, and the engine they build.

Kept apart from :mod:`bridge.cli` so that the vision flags live with the
vision code; ``cli`` calls :func:`add_vision_options` on its parser and
:func:`routing_engine` to put the vision engine next to the text engine.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from bridge.arguments import positive_int
from bridge.engines.engine_protocol import ModelEngine
from bridge.engines.routing import RoutingEngine
from bridge.engines.vision.images import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGES, ImagePolicy


def add_vision_options(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("vision models (needs the vlm extra: mlx-bridge[vlm])")
    group.add_argument(
        "--allow-remote-images",
        action="store_true",
        help="let chat image parts be http(s) URLs, which the worker then fetches "
        "(default: refused with bad_image; keep it off when the worker serves end users' "
        "messages)",
    )
    group.add_argument(
        "--image-root",
        action="append",
        type=image_root,
        default=[],
        metavar="DIR",
        help="read local images (file paths and file:// URLs) only from inside DIR, after "
        "resolving symlinks and '..'; others are refused with forbidden. Repeatable. "
        "Default: any absolute path the worker can read (regular files only); a host "
        "that forwards end users' messages should set it",
    )
    group.add_argument(
        "--max-image-bytes",
        type=positive_int,
        default=DEFAULT_MAX_IMAGE_BYTES,
        metavar="N",
        help=f"largest image, in bytes (encoded); larger is image_too_large "
        f"(default: {DEFAULT_MAX_IMAGE_BYTES})",
    )
    group.add_argument(
        "--max-images",
        type=positive_int,
        default=DEFAULT_MAX_IMAGES,
        metavar="N",
        help=f"most images in one chat request; more is image_too_large "
        f"(default: {DEFAULT_MAX_IMAGES})",
    )


def image_policy(args: argparse.Namespace) -> ImagePolicy:
    return ImagePolicy(
        max_bytes=args.max_image_bytes,
        max_images=args.max_images,
        allow_remote=args.allow_remote_images,
        roots=tuple(args.image_root),
    )


def image_root(text: str) -> str:
    """An existing directory, as its real path (symlinks and '..' resolved)."""
    if "\x00" in text:
        raise argparse.ArgumentTypeError("contains a NUL byte")
    real = os.path.realpath(os.path.expanduser(text))
    if not os.path.isdir(real):
        raise argparse.ArgumentTypeError(f"not a directory: {text}")
    return real


def routing_engine(
    text: ModelEngine,
    args: argparse.Namespace,
    *,
    require_vision: Callable[[str], None] | None = None,
) -> RoutingEngine:
    """``text`` for text models, and an mlx-vlm engine, built on first use,
    for vision models; ``args`` holds the engine and vision options;
    ``require_vision(path)`` may refuse vision models (``load_failed``)."""
    policy = image_policy(args)

    def vision() -> ModelEngine:
        from bridge.engines.vision.engine import MlxVlmEngine

        return MlxVlmEngine(
            prefill_step_size=args.prefill_step_size,
            memory_budget=args.memory_budget,
            images=policy,
            trust_remote_code=args.trust_remote_code,
            max_prompt_tokens=args.max_prompt_tokens or None,
            prompt_cache_entries=args.prompt_cache_entries,
            prompt_cache_bytes=args.prompt_cache_bytes,
            max_concurrency=args.max_concurrency,
        )

    return RoutingEngine(
        text,
        vision,
        memory_budget=args.memory_budget,
        trust_remote_code=args.trust_remote_code,
        model_root=args.model_root,
        require_vision=require_vision,
    )
