"""What rank 0 tells the other ranks, and what they answer, over each rank's pipes.

Rank 0 writes :data:`Order` frames to a rank's stdin; the rank writes
:data:`Answer` frames to its own stdout, which is no protocol stream (it
is a child of rank 0, and its fd 1 points at stderr like the worker's).
A frame is a 4-byte big-endian length and a pickle of a list of messages:
one frame per decoder step carries the step and every admission and removal
since the last one, in order.

Pickle is safe here because only rank 0, our own parent process, writes a
rank's stdin (or ``ssh`` carrying it from rank 0); nothing a host sends is
unpickled, it is data inside frozen messages.
"""

from __future__ import annotations

import os
import pickle
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any

from bridge.engines.engine_protocol import Decoded, Event
from protocol.requests import OutputConstraint, Sampling

_LENGTH = struct.Struct(">I")
MAX_FRAME = 1 << 30


# -- rank 0 → rank r ------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Start:
    """First frame: who the rank is and how to build its engine."""

    rank: int
    engine_options: dict[str, Any]
    mode: str
    backend: str


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadModel:
    path: str  # resolved and checked by rank 0
    context_len: int | None
    trust_remote_code: bool
    seed: int  # every rank seeds MLX's global PRNG with it, so unseeded sampling agrees


@dataclass(frozen=True, slots=True, kw_only=True)
class UnloadModel:
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class Add:
    seq: int
    tokens: tuple[int, ...]
    sampling: Sampling
    cache_key: str | None
    cached: int  # prompt tokens rank 0 found in its prompt cache; every rank must find as many
    output: OutputConstraint | None = None  # the grammar; every rank compiles and applies it


@dataclass(frozen=True, slots=True, kw_only=True)
class Remove:
    seq: int


# (sequence, token id) of every token rank 0 decoded in its last step
StepTokens = tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class StepBatch:
    last: StepTokens  # rank 0's previous step, which the rank checks its own against


@dataclass(frozen=True, slots=True, kw_only=True)
class CloseDecoder:
    last: StepTokens


@dataclass(frozen=True, slots=True, kw_only=True)
class AskMemory:
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class Stop:
    pass


Order = Start | LoadModel | UnloadModel | Add | Remove | StepBatch | CloseDecoder | AskMemory | Stop


# -- rank r → rank 0 ------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Ready:
    rank: int
    pid: int
    host: str
    device: str


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadResult:
    rank: int
    error: str | None  # None: loaded
    weights_bytes: int = 0  # MLX's active memory after the load


@dataclass(frozen=True, slots=True, kw_only=True)
class Memory:
    rank: int
    active_bytes: int
    peak_bytes: int
    cache_bytes: int
    rss_bytes: int


Answer = Ready | LoadResult | Memory


def decoded_tokens(events: Sequence[Event]) -> StepTokens:
    """The (sequence, token) pairs of one step, which every rank must have drawn alike."""
    return tuple((e.seq, e.step.token_id) for e in events if isinstance(e, Decoded))


# -- framing --------------------------------------------------------------------------


def encode(messages: Sequence[Order | Answer]) -> bytes:
    body = pickle.dumps(list(messages), protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


def write_frame(fd: int, messages: Sequence[Order | Answer]) -> None:
    """All of one frame, however many writes the pipe takes."""
    view = memoryview(encode(messages))
    while view:
        view = view[os.write(fd, view) :]


def read_frame(stream: IO[bytes]) -> list[Any] | None:
    """The next frame's messages; None at end of stream (the other side is gone)."""
    head = _read_exactly(stream, _LENGTH.size)
    if head is None:
        return None
    (length,) = _LENGTH.unpack(head)
    if length > MAX_FRAME:
        raise ValueError(f"control frame of {length} bytes is over {MAX_FRAME}")
    body = _read_exactly(stream, length)
    if body is None:
        return None
    messages = pickle.loads(body)
    if not isinstance(messages, list):
        raise ValueError("control frame does not hold a list")
    return messages


def _read_exactly(stream: IO[bytes], n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data
