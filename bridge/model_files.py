"""Find a model's directory and decide whether its weights fit in memory.

No MLX here: this runs before anything is loaded. A ``path`` is a local
directory or a Hugging Face repo id that is already in the local cache; the
hub itself is never contacted.
"""

from __future__ import annotations

from pathlib import Path

from protocol.errors import LoadFailed, ModelNotFound, OutOfMemory

# A model is refused when its weights take more than this share of the
# memory that is available. The rest is left for the KV cache and activations.
MEMORY_HEADROOM = 0.9


def resolve_model_dir(path: str) -> Path:
    try:
        local = Path(path).expanduser()
        exists = local.exists()
    except (RuntimeError, OSError) as exc:  # ~nosuchuser; a name too long for the OS
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ModelNotFound(f"path: cannot resolve {path[:200]}: {reason}") from None
    if exists:
        if not local.is_dir():
            raise ModelNotFound(f"path: {path} is a file, not a model directory")
        return _checked(local)
    if _looks_like_repo_id(path):
        return _checked(_from_hub_cache(path))
    raise ModelNotFound(f"path: no such directory: {path}")


def _checked(directory: Path) -> Path:
    if not (directory / "config.json").is_file():
        raise LoadFailed(f"path: {directory} is not a model directory (no config.json)")
    if not any(directory.glob("*.safetensors")):
        raise LoadFailed(f"path: {directory} has no *.safetensors weights")
    return directory


def _looks_like_repo_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "~"))


def _from_hub_cache(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        raise ModelNotFound(
            f"path: {repo_id} is neither a local directory nor in the local Hugging Face "
            "cache (the worker never downloads; fetch it first)"
        ) from None
    except Exception as exc:  # malformed ids and cache errors
        raise ModelNotFound(f"path: {repo_id}: {exc}") from None


def weights_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def check_fits(needed: int, available: int, *, force: bool) -> None:
    """Refuse weights that clearly won't fit, unless forced."""
    if force or needed <= available * MEMORY_HEADROOM:
        return
    raise OutOfMemory(
        f"model weights are {_gib(needed)} but only {_gib(available)} of memory is "
        f'available; free memory or send "force": true to load anyway'
    )


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"
