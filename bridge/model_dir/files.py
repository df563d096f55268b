"""Find a model's directory, check every file a loader will open, and decide
whether the model fits in memory.

No MLX here: this runs on every ``load``, before anything is loaded. A
``path`` is a local directory or a Hugging Face repo id that is already in
the local cache; the hub itself is never contacted.

A model directory is untrusted input (docs/security.md). :func:`open_model`
checks it before mlx-lm, mlx-vlm or transformers open anything in it:

- every file a loader may read (``config.json``, tokenizer and processor
  files, chat templates, ``*.safetensors``, the index, ``*.py``) must be a
  regular file (after symlinks): a FIFO, socket, device or directory by such
  a name is ``load_failed`` naming it, and so is a dangling symlink;
- the files loaders read whole are bounded: configs, chat templates and
  code by :data:`MAX_CONFIG_BYTES`, vocabularies by :data:`MAX_DATA_BYTES`;
  ``config.json`` is read with a nesting bound, and every ``*.safetensors``
  header is read and checked (:mod:`bridge.model_dir.safetensors_header`);
- ``config.json`` is checked against the weights (:mod:`bridge.model_dir.config`);
- the same holds for ``adapter_path`` (``adapter_config.json`` and
  ``adapters.safetensors``).

With a model root (``--model-root DIR``), ``path`` and ``adapter_path`` must
resolve inside it: a relative path is taken relative to the root, ``..`` is
refused, and so is anything whose real path (after symlinks, for the
directory and for every file checked in it) leaves the root, a path that is
not a directory, and a repo id whose cached snapshot lies outside the root.
All of these are ``forbidden``.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from bridge.model_dir.config import check_config, kv_cache_bytes, text_figures
from bridge.model_dir.safetensors_header import Weights, read_weights
from bridge.model_dir.untrusted import check_regular, parse_json, read_bounded, size_text
from protocol.errors import Forbidden, InvalidRequest, LoadFailed, ModelNotFound, OutOfMemory

# A model is refused when its weights and KV cache take more than this share
# of the memory that is available. The rest is left for activations.
MEMORY_HEADROOM = 0.9

# Largest config-like file (JSON, chat template, Python) a loader may read
# whole, and largest vocabulary file (tokenizer.json, merges.txt,
# tokenizer.model, the safetensors index). The largest real tokenizer.json
# files are about 35 MB.
MAX_CONFIG_BYTES = 16 * 2**20
MAX_DATA_BYTES = 256 * 2**20

# The KV cache the memory gate counts when the load gives no context_len: the
# model's max_position_embeddings, but at most this many tokens. A host that
# means to use longer contexts sends context_len, and the gate counts that.
DEFAULT_GATE_TOKENS = 8192

# Names a loader may read from a model directory, by suffix: each must be a
# regular file. Files with other names (README.md, .gitattributes) are never
# opened and not checked.
_LOADER_SUFFIXES = (
    ".json",
    ".jinja",
    ".py",
    ".safetensors",
    ".txt",
    ".model",
    ".tiktoken",
    ".jsonl",
    ".vocab",
    ".bpe",
)
# The ones loaders read whole, and their bound: configs, templates and code ...
_CONFIG_ENDINGS = (
    "config.json",
    "chat_template.json",
    "special_tokens_map.json",
    "added_tokens.json",
    ".jinja",
    ".py",
)
# ... and vocabularies. Other names (trainer_state.json, LICENSE.txt) are
# checked for being regular files only.
_DATA_ENDINGS = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "model.safetensors.index.json",
    ".model",
    ".tiktoken",
    ".vocab",
    ".bpe",
)
_TEMPLATE_DIRS = ("additional_chat_templates",)


@dataclass(frozen=True, slots=True)
class Footprint:
    """What a model will take in memory."""

    weights: int
    kv_cache: int
    kv_tokens: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache


@dataclass(frozen=True, slots=True)
class ModelFiles:
    """A model directory whose files passed the checks."""

    directory: Path
    config: dict[str, object]
    weights: Weights
    adapter: Path | None
    # a draft model for speculative decoding (``load``'s ``draft_path``), checked alike
    draft: ModelFiles | None = None

    @property
    def weights_bytes(self) -> int:
        return self.weights.total_bytes

    def max_positions(self) -> int | None:
        text = text_figures(self.config)
        for source in (text, self.config):
            for key in ("max_position_embeddings", "max_seq_len", "n_positions"):
                value = source.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
        return None

    def footprint(self, context_len: int | None) -> Footprint:
        """Weights plus the KV cache of ``context_len`` tokens (else the
        model's context, at most :data:`DEFAULT_GATE_TOKENS`)."""
        tokens = context_len or min(
            self.max_positions() or DEFAULT_GATE_TOKENS, DEFAULT_GATE_TOKENS
        )
        draft = self.draft.weights_bytes if self.draft is not None else 0
        return Footprint(
            weights=self.weights_bytes + draft,
            kv_cache=kv_cache_bytes(self.config, self.weights, tokens),
            kv_tokens=tokens,
        )


def open_model(
    path: str,
    adapter_path: str | None = None,
    *,
    root: Path | None = None,
    field: str = "path",
) -> ModelFiles:
    """Resolve ``path`` (and ``adapter_path``) and check everything a loader
    will read; ``root`` confines both (see the module docstring). Errors
    about ``path`` name ``field`` (``draft_path`` for a draft model)."""
    directory = resolve_model_dir(path, root=root, field=field)
    config = read_config(directory, field=field)
    weights = read_weights(_weight_files(directory), field=field)
    check_config(config, weights)
    adapter = resolve_adapter_dir(adapter_path, root=root) if adapter_path is not None else None
    return ModelFiles(directory=directory, config=config, weights=weights, adapter=adapter)


def resolve_model_dir(path: str, *, root: Path | None = None, field: str = "path") -> Path:
    local = _local_path(path, field, root)
    st = _stat(local)
    if st is not None:
        if root is not None:
            _check_inside(local, root, field, path)
        if not stat.S_ISDIR(st.st_mode):
            if root is not None:
                raise Forbidden(f"{field}: {path} is not a directory")
            raise ModelNotFound(f"{field}: {path} is a file, not a model directory")
        return _checked(local, root, field)
    if _looks_like_repo_id(path):
        snapshot = _from_hub_cache(path, field)
        if root is not None and not Path(os.path.realpath(snapshot)).is_relative_to(root):
            raise Forbidden(
                f"{field}: {path} is cached at {snapshot}, outside the model root {root}"
            )
        return _checked(snapshot, root, field)
    raise ModelNotFound(f"{field}: no such directory: {path}")


def confine(path: str, field: str, root: Path) -> Path:
    """``path`` as it will be read, checked to stay inside ``root`` (the
    ``--model-root`` rules: no ``..``, nothing outside, no symlink leading
    out), whether or not it exists; ``forbidden`` otherwise."""
    local = _local_path(path, field, root)
    if _stat(local) is not None:
        _check_inside(local, root, field, path)
    return local


def resolve_adapter_dir(path: str, *, root: Path | None = None) -> Path:
    local = _local_path(path, "adapter_path", root)
    st = _stat(local)
    if st is None:
        raise LoadFailed(f"adapter_path: no such directory: {path}")
    if root is not None:
        _check_inside(local, root, "adapter_path", path)
    if not stat.S_ISDIR(st.st_mode):
        if root is not None:
            raise Forbidden(f"adapter_path: {path} is not a directory")
        raise LoadFailed(f"adapter_path: {path} is not a directory")
    _check_loader_files(local, root, "adapter_path")
    config = local / "adapter_config.json"
    weights = local / "adapters.safetensors"
    for required in (config, weights):
        if _stat(required) is None:
            raise LoadFailed(f"adapter_path: {local} has no {required.name}")
    parse_json(
        read_bounded(config, field="adapter_path", limit=MAX_CONFIG_BYTES),
        path=config,
        field="adapter_path",
    )
    read_weights([weights], field="adapter_path")
    return local


def read_config(directory: Path, *, field: str = "path") -> dict[str, object]:
    """``config.json``, read with the size and nesting bounds."""
    path = directory / "config.json"
    config = parse_json(
        read_bounded(path, field=field, limit=MAX_CONFIG_BYTES), path=path, field=field
    )
    if not isinstance(config, dict):
        raise LoadFailed(f"{field}: {path} is not a JSON object")
    return config


def weights_bytes(directory: Path) -> int:
    total = 0
    for f in _weight_files(directory):
        st = _stat(f)
        total += st.st_size if st is not None else 0
    return total


def check_fits(needed: Footprint, available: int, *, force: bool) -> None:
    """Refuse a model whose weights and KV cache clearly won't fit, unless forced."""
    if force or needed.total <= available * MEMORY_HEADROOM:
        return
    raise OutOfMemory(
        f"model weights are {size_text(needed.weights)} and a KV cache of "
        f"{needed.kv_tokens} tokens is {size_text(needed.kv_cache)} "
        f"({size_text(needed.total)} in all), but only {size_text(available)} of memory "
        f'is available; free memory, send a smaller context_len, or send "force": true '
        "to load anyway"
    )


# -- paths ------------------------------------------------------------------------------


def _local_path(path: str, field: str, root: Path | None) -> Path:
    if "\0" in path:
        raise InvalidRequest(f"{field}: contains a NUL byte")
    expanded = os.path.expanduser(path)  # unlike Path.expanduser, never raises for ~nobody
    local = Path(expanded)
    if root is None:
        return local
    if ".." in local.parts:
        raise Forbidden(f"{field}: {path} contains '..', which --model-root does not allow")
    local = local if local.is_absolute() else root / local
    if not local.is_relative_to(root):  # refused alike whether it exists or not
        raise Forbidden(f"{field}: {path} is outside the model root {root}")
    return local


def _check_inside(path: Path, root: Path, field: str, shown: str) -> None:
    """Refuse ``path`` when its real path (symlinks resolved) leaves ``root``;
    the message does not say where the symlinks lead."""
    if not Path(os.path.realpath(path)).is_relative_to(root):
        raise Forbidden(f"{field}: {shown} leads outside the model root {root} (by a symlink)")


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except (OSError, ValueError):
        return None


def _checked(directory: Path, root: Path | None, field: str) -> Path:
    if _stat(directory / "config.json") is None and not os.path.islink(directory / "config.json"):
        raise LoadFailed(f"{field}: {directory} is not a model directory (no config.json)")
    _check_loader_files(directory, root, field)
    if not _weight_files(directory):
        raise LoadFailed(f"{field}: {directory} has no *.safetensors weights")
    return directory


def _check_loader_files(directory: Path, root: Path | None, field: str) -> None:
    """Every file a loader may read must be a bounded regular file (inside
    the root, when there is one)."""
    for name, path in _loader_files(directory, field):
        limit = _limit(name)
        if root is not None and os.path.lexists(path):
            _check_inside(path, root, field, str(path))
        check_regular(path, field=field, limit=limit)


def _loader_files(directory: Path, field: str) -> list[tuple[str, Path]]:
    found: list[tuple[str, Path]] = []
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.name in _TEMPLATE_DIRS and entry.is_dir(follow_symlinks=False):
                    found += [(sub, Path(entry.path) / sub) for sub in _names(Path(entry.path))]
                elif _loader_reads(entry.name):
                    found.append((entry.name, Path(entry.path)))
    except OSError as exc:
        raise LoadFailed(f"{field}: cannot list {directory}: {exc.strerror}") from None
    return sorted(found)


def _names(directory: Path) -> list[str]:
    try:
        return [n for n in os.listdir(directory) if not n.startswith(".")]
    except OSError:
        return []


def _loader_reads(name: str) -> bool:
    return name.endswith(_LOADER_SUFFIXES) or name.startswith("tokenizer.")


def _limit(name: str) -> int | None:
    """The size bound of a file a loader reads whole; None for the others
    (``*.safetensors`` is mapped: its header is checked and the gate counts it)."""
    if name.endswith(_DATA_ENDINGS) or name.startswith("tokenizer."):
        return MAX_DATA_BYTES
    if name.endswith(_CONFIG_ENDINGS):
        return MAX_CONFIG_BYTES
    return None


def _weight_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.safetensors") if not p.name.startswith("."))


# -- the hub cache ----------------------------------------------------------------------


def _looks_like_repo_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "~"))


def _from_hub_cache(repo_id: str, field: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        raise ModelNotFound(
            f"{field}: {repo_id} is neither a local directory nor in the local Hugging Face "
            "cache (the worker never downloads; fetch it first)"
        ) from None
    except Exception as exc:  # malformed ids and cache errors
        raise ModelNotFound(f"{field}: {repo_id}: {exc}") from None
