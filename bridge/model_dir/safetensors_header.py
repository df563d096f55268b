"""Read the headers of ``*.safetensors`` files ourselves, before any loader does.

A safetensors file is an 8-byte little-endian header length N, N bytes of
JSON (tensor name → ``dtype``, ``shape``, ``data_offsets`` into the data that
follows), then the data. The header tells what the weights hold (the layer
count and shapes that :mod:`bridge.model_dir.config` checks ``config.json``
against, the dtype the KV cache will have) without reading the data.

Nothing here trusts the file: it is opened without blocking
(:mod:`bridge.model_dir.untrusted`), N is bounded (as the safetensors library
bounds it) and must fit in the file, and every tensor's offsets must lie in
the file and match its shape and dtype. Failures are ``load_failed`` naming
the file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from bridge.model_dir.untrusted import open_regular, parse_json, read_exactly
from protocol.errors import LoadFailed

# The safetensors library refuses headers over 100 MB; so do we.
MAX_HEADER_BYTES = 100_000_000

# Bytes per element of the dtypes safetensors names. Others (sub-byte float
# formats) are accepted without the size check.
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "E8M0": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
    "C64": 8,
}

FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


@dataclass(frozen=True, slots=True)
class Tensor:
    dtype: str
    shape: tuple[int, ...]
    file: str

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True, slots=True)
class Weights:
    """Every tensor of a model's ``*.safetensors`` files, by name."""

    tensors: Mapping[str, Tensor]
    total_bytes: int


def read_weights(files: Iterable[Path], *, field: str) -> Weights:
    tensors: dict[str, Tensor] = {}
    total = 0
    for path in files:
        header, size = read_header(path, field=field)
        tensors.update(header)
        total += size
    return Weights(tensors=tensors, total_bytes=total)


def read_header(path: Path, *, field: str) -> tuple[dict[str, Tensor], int]:
    """The tensors of one file, and the file's size."""
    fd, size = open_regular(path, field=field, limit=None)
    try:
        if size < 8:
            raise LoadFailed(f"{field}: {path} is {size} bytes, too short for safetensors")
        length = int.from_bytes(read_exactly(fd, 8, path=path, field=field), "little")
        if not 2 <= length <= MAX_HEADER_BYTES:
            raise LoadFailed(
                f"{field}: {path}: safetensors header length {length} is outside "
                f"2..{MAX_HEADER_BYTES}"
            )
        if 8 + length > size:
            raise LoadFailed(
                f"{field}: {path}: safetensors header length {length} does not fit in "
                f"the file of {size} bytes"
            )
        raw = read_exactly(fd, length, path=path, field=field)
    finally:
        os.close(fd)
    header = parse_json(raw.rstrip(b" "), path=path, field=field)
    return _tensors(header, path=path, field=field, data_bytes=size - 8 - length), size


def _tensors(header: object, *, path: Path, field: str, data_bytes: int) -> dict[str, Tensor]:
    def bad(problem: str) -> LoadFailed:
        return LoadFailed(f"{field}: {path}: bad safetensors header: {problem}")

    if not isinstance(header, dict):
        raise bad("not a JSON object")
    out: dict[str, Tensor] = {}
    ranges: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict):
                raise bad("__metadata__ is not an object")
            continue
        if not isinstance(entry, dict):
            raise bad(f"{name}: not an object")
        dtype = entry.get("dtype")
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        if not isinstance(dtype, str):
            raise bad(f"{name}: dtype is not a string")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise bad(f"{name}: shape is not a list of integers ≥ 0")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_count(o) for o in offsets)
            or not offsets[0] <= offsets[1] <= data_bytes
        ):
            raise bad(
                f"{name}: data_offsets {offsets!r} are not within the {data_bytes} data bytes"
            )
        tensor = Tensor(dtype=dtype, shape=tuple(shape), file=path.name)
        width = DTYPE_BYTES.get(dtype)
        if width is not None and tensor.size * width != offsets[1] - offsets[0]:
            raise bad(
                f"{name}: {dtype} {list(shape)} needs {tensor.size * width} bytes, "
                f"data_offsets give {offsets[1] - offsets[0]}"
            )
        out[name] = tensor
        ranges.append((offsets[0], offsets[1], name))
    # The safetensors rule: the tensors tile the data exactly, without gaps
    # or overlaps. Overlapping tensors would make the file's size (which the
    # memory gate counts) far less than what loading it takes.
    end = 0
    for begin, stop, name in sorted(ranges):
        if begin != end:
            problem = "overlaps another tensor" if begin < end else f"leaves bytes {end}..{begin}"
            raise bad(f"{name}: data_offsets [{begin}, {stop}] {problem}")
        end = stop
    if end != data_bytes:
        raise bad(f"the tensors cover {end} of the {data_bytes} data bytes")
    return out


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63
