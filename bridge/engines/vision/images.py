"""Image parts of chat messages: fetch their bytes, check the caps, decode them.

An ``image_url`` may be

- a ``data:`` URL with base64 content (``data:image/png;base64,…``);
- a ``file://`` URL (with no host, or ``localhost``) or an absolute path,
  read from the worker's file system;
- an ``http(s)://`` URL, fetched only when the worker was started with
  ``--allow-remote-images`` (otherwise refused: a host should not be able to
  make the worker fetch arbitrary URLs by accident).

Local files:

- Only regular files are read. The file is opened with ``O_NONBLOCK`` (so a
  FIFO cannot block the engine thread), the opened descriptor is checked
  with ``fstat``, and at most ``--max-image-bytes`` + 1 bytes are read from
  it: ``/dev/stdin``, ``/proc/self/fd/0``, FIFOs, devices and directories are
  ``bad_image``, and nothing is read from them.
- With ``--image-root DIR`` (repeatable), a file must lie inside one of the
  roots once symlinks and ``..`` are resolved, else ``forbidden``. The check
  is made on the path of the file actually opened (``/proc/self/fd`` on Linux,
  ``F_GETPATH`` on macOS), so swapping a symlink after the check does not
  escape. Without a root, any absolute path the worker can read is accepted:
  a host that forwards end users' messages should set ``--image-root``.
- Error messages give no size of a file that is not an image and no facts
  about a file outside the roots (not even whether it exists).

Images are decoded in memory, with Pillow, into RGB images that mlx-vlm takes
as they are; nothing is written to disk.

Errors name the content part, like every request error:

- ``image_too_large``: more bytes than ``--max-image-bytes``, more images
  than ``--max-images``, or more pixels than Pillow's decompression-bomb
  limit;
- ``bad_image``: an unsupported or malformed URL (a ``file://`` URL with a
  host, a NUL byte in a path), a missing, unreadable or not regular file, a
  refused or failed download, or bytes Pillow cannot decode;
- ``forbidden``: a local file outside every ``--image-root``.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import stat
import sys
import urllib.parse
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bridge.model_dir.untrusted import is_inside
from protocol.errors import BadImage, Forbidden, ImageTooLarge, RequestId
from protocol.requests import ChatMessage, ImagePart

if TYPE_CHECKING:
    from PIL.Image import Image

DEFAULT_MAX_IMAGE_BYTES = 20 * 2**20
DEFAULT_MAX_IMAGES = 8
REMOTE_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ImagePolicy:
    """What the worker accepts as an image; set from the command line."""

    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_images: int = DEFAULT_MAX_IMAGES
    allow_remote: bool = False
    remote_timeout_s: float = REMOTE_TIMEOUT_S
    # real paths of the --image-root directories; empty: any absolute path
    roots: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class LocatedImage:
    """An image part and the field that names it in error messages."""

    message: int
    field: str
    part: ImagePart


def image_parts(messages: Sequence[ChatMessage]) -> Iterator[LocatedImage]:
    for i, message in enumerate(messages):
        if isinstance(message.content, tuple):
            for j, part in enumerate(message.content):
                if isinstance(part, ImagePart):
                    field = f"messages[{i}].content[{j}].image_url"
                    yield LocatedImage(message=i, field=field, part=part)


def load_images(
    located: Sequence[LocatedImage], policy: ImagePolicy, *, request_id: RequestId | None
) -> list[Image]:
    """Read and decode every image, in order; raises at the first bad one."""
    if len(located) > policy.max_images:
        raise ImageTooLarge(
            f"messages: {len(located)} images, more than the limit of {policy.max_images} "
            "per request (--max-images)",
            request_id=request_id,
        )
    images = []
    for item in located:
        data = read_image_bytes(item.part.url, policy, field=item.field, request_id=request_id)
        images.append(decode_image(data, field=item.field, request_id=request_id))
    return images


def read_image_bytes(
    url: str, policy: ImagePolicy, *, field: str, request_id: RequestId | None
) -> bytes:
    if url.startswith("/"):
        return _read_file(url, policy, field=field, request_id=request_id)
    match urllib.parse.urlsplit(url).scheme.lower():
        case "data":
            return _read_data_url(url, policy, field=field, request_id=request_id)
        case "file":
            parts = urllib.parse.urlsplit(url)
            if parts.netloc.lower() not in ("", "localhost"):
                raise BadImage(
                    f"{field}: a file:// URL must name a local file (no host, or localhost), "
                    f"got host {_clip(parts.netloc)!r}",
                    request_id=request_id,
                )
            path = urllib.parse.unquote(parts.path)
            return _read_file(path, policy, field=field, request_id=request_id)
        case "http" | "https":
            if not policy.allow_remote:
                raise BadImage(
                    f"{field}: remote image URLs are refused; send the image as a data: URL "
                    "or a file path, or start the worker with --allow-remote-images",
                    request_id=request_id,
                )
            return _fetch(url, policy, field=field, request_id=request_id)
    raise BadImage(
        f"{field}: expected a data: URL, a file:// URL or an absolute path, got {_clip(url)!r}",
        request_id=request_id,
    )


def decode_image(data: bytes, *, field: str, request_id: RequestId | None) -> Image:
    """Decode fully (not lazily), so that a truncated file fails here, and
    convert to RGB the way mlx-vlm's own ``load_image`` does."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"{field}: {exc}", request_id=request_id) from None
    except UnidentifiedImageError:
        # no size: it would tell a sender the size of any local file that is not an image
        raise BadImage(f"{field}: not an image Pillow can decode", request_id=request_id) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"{field}: the image is damaged: {exc}", request_id=request_id) from None
    if image.width < 1 or image.height < 1:
        raise BadImage(f"{field}: the image is empty", request_id=request_id)
    return ImageOps.exif_transpose(image).convert("RGB")


# -- sources ------------------------------------------------------------------------


def _read_data_url(
    url: str, policy: ImagePolicy, *, field: str, request_id: RequestId | None
) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma:
        raise BadImage(f"{field}: a data: URL needs a ',' before its data", request_id=request_id)
    if not header.lower().endswith(";base64"):
        raise BadImage(f"{field}: only base64 data: URLs are supported", request_id=request_id)
    # base64 is 4 characters per 3 bytes; check before decoding a huge string
    if (len(payload) // 4) * 3 > policy.max_bytes + 2:
        raise _too_large(field, (len(payload) // 4) * 3, policy, request_id)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadImage(
            f"{field}: the data: URL is not valid base64", request_id=request_id
        ) from None
    if len(data) > policy.max_bytes:
        raise _too_large(field, len(data), policy, request_id)
    return data


def _read_file(
    path_text: str, policy: ImagePolicy, *, field: str, request_id: RequestId | None
) -> bytes:
    """The bytes of a regular file, at most the cap + 1; see the module's docstring."""
    if "\x00" in path_text:
        raise BadImage(f"{field}: the file path contains a NUL byte", request_id=request_id)
    path = Path(path_text)
    if not path.is_absolute():
        raise BadImage(f"{field}: a file path must be absolute, got {path}", request_id=request_id)
    if policy.roots and not any(is_inside(os.path.realpath(path), root) for root in policy.roots):
        raise _outside_roots(field, path, request_id)
    try:
        # stat first, so that a device is refused without being opened (opening
        # one can have effects); fstat below is what decides
        _require_regular(os.stat(path).st_mode, field, path, request_id)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BadImage(f"{field}: no such file: {path}", request_id=request_id) from None
    except OSError as exc:
        raise BadImage(
            f"{field}: cannot read {path}: {exc.strerror or exc}", request_id=request_id
        ) from None
    try:
        _require_regular(os.fstat(fd).st_mode, field, path, request_id)
        if policy.roots and not any(
            is_inside(_opened_path(fd, path), root) for root in policy.roots
        ):
            raise _outside_roots(field, path, request_id)  # a symlink swapped after the check
        data = _read_at_most(fd, policy.max_bytes + 1)
    except OSError as exc:
        raise BadImage(
            f"{field}: cannot read {path}: {exc.strerror or exc}", request_id=request_id
        ) from None
    finally:
        os.close(fd)
    if len(data) > policy.max_bytes:
        raise _too_large(field, len(data), policy, request_id)
    return data


def _require_regular(mode: int, field: str, path: Path, request_id: RequestId | None) -> None:
    if stat.S_ISREG(mode):
        return
    kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
    raise BadImage(
        f"{field}: {path} is {kind}; images are read from regular files only",
        request_id=request_id,
    )


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks = []
    left = limit
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _opened_path(fd: int, path: Path) -> str:
    """The real path of the file open on ``fd``, as the kernel knows it."""
    try:
        if sys.platform == "linux":
            return os.readlink(f"/proc/self/fd/{fd}")
        if sys.platform == "darwin":
            import fcntl

            raw = fcntl.fcntl(fd, fcntl.F_GETPATH, bytes(1024))
            return os.fsdecode(raw.split(b"\0", 1)[0])
    except OSError:
        pass  # no /proc (a bare container): the check made before opening stands
    return os.path.realpath(path)


def _outside_roots(field: str, path: Path, request_id: RequestId | None) -> Forbidden:
    # the path as given: not whether it exists, nor where its symlinks lead
    return Forbidden(
        f"{field}: {path} is outside the directories this worker reads images from (--image-root)",
        request_id=request_id,
    )


def _fetch(url: str, policy: ImagePolicy, *, field: str, request_id: RequestId | None) -> bytes:
    import urllib.request  # about 40 ms (http.client, ssl): not before the first hello

    request = urllib.request.Request(url, headers={"User-Agent": "mlx-bridge"})
    try:
        with urllib.request.urlopen(request, timeout=policy.remote_timeout_s) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > policy.max_bytes:
                raise _too_large(field, int(declared), policy, request_id)
            data: bytes = response.read(policy.max_bytes + 1)
    except (ImageTooLarge, BadImage):
        raise
    except Exception as exc:  # URLError, HTTPError, timeouts, bad URLs
        raise BadImage(
            f"{field}: could not fetch {_clip(url)}: {exc}", request_id=request_id
        ) from None
    if len(data) > policy.max_bytes:
        raise _too_large(field, len(data), policy, request_id)
    return data


def _too_large(
    field: str, size: int, policy: ImagePolicy, request_id: RequestId | None
) -> ImageTooLarge:
    """``size`` is exact, or (when only a prefix was read) the limit + 1."""
    known = f"is {size} bytes, " if size > policy.max_bytes + 1 else "is "
    return ImageTooLarge(
        f"{field}: the image {known}over the limit of {policy.max_bytes} bytes (--max-image-bytes)",
        request_id=request_id,
    )


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
