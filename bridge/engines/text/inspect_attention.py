"""Capture every layer's attention queries and keys for one prompt (``inspect``).

One prefill forward pass over the whole prompt, with a fresh KV cache; for
each transformer layer the post-RoPE queries and keys (after any q/k norm,
before the softmax scale) are written to a directory:

- ``queries_NN.bin``: little-endian float32, C order, shape
  ``[num_q_heads, seq_len, head_dim]``;
- ``keys_NN.bin``: the same with ``num_kv_heads`` heads (before any GQA
  repetition);
- ``inspect.json``: the figures of the reply, plus the shapes and the dtype.

``NN`` is the layer index, zero-padded to two digits (``keys_00.bin``, …,
``keys_27.bin``; ``keys_100.bin`` past 99).

How: go-mlx's bridge hooked ``attn.__call__`` on each attention *instance*,
which Python never consults (it looks up ``__call__`` on the type), so it
captured nothing. Here each attention module's ``rope`` child is replaced,
for the duration of the pass, by a recording module that wraps it: mlx-lm's
attention calls ``self.rope(queries, offset)`` and then ``self.rope(keys,
offset)``, and the wrapper keeps both outputs. The originals are put back in
``finally``. A layer whose attention has no ``rope`` child, or that does not
call it exactly once for queries and once for keys with the expected head
counts, makes the capture fail with a clear message rather than write
wrong data.

Only this module and the engines import MLX; it is imported lazily, by
:func:`capture_attention` alone. The rest (the file layout, the output
directory, the wire errors) needs no MLX: mock_worker's scripted engine
writes its made-up captures with :func:`save_capture`, so both workers lay
their files out alike.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge.engines.prompt_tokens import encode_prompt
from protocol.errors import InvalidRequest, RequestId
from protocol.replies import AttentionFacts

ATTENTION_NAMES = ("self_attn", "attention", "attn")
DIR_PREFIX = "mlx-bridge-inspect-"


class InspectError(Exception):
    """The model's layout is not one this capture understands."""


class EmptyPrompt(InspectError):
    """The prompt encodes to zero tokens."""


class BadDirectory(InspectError):
    """The output directory cannot be created or written to."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AttentionCapture:
    directory: Path
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    seq_len: int
    head_dim: int
    architecture: str

    def layout(self) -> dict[str, object]:
        return {
            "dir": str(self.directory),
            "num_layers": self.num_layers,
            "num_q_heads": self.num_q_heads,
            "num_kv_heads": self.num_kv_heads,
            "seq_len": self.seq_len,
            "head_dim": self.head_dim,
            "architecture": self.architecture,
            "dtype": "float32",
            "byte_order": "little",
            "queries_shape": [self.num_q_heads, self.seq_len, self.head_dim],
            "keys_shape": [self.num_kv_heads, self.seq_len, self.head_dim],
            "files": {"queries": "queries_{layer:02d}.bin", "keys": "keys_{layer:02d}.bin"},
        }

    def facts(self) -> AttentionFacts:
        """The figures of the ``inspected`` reply."""
        return AttentionFacts(
            dir=str(self.directory),
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            num_q_heads=self.num_q_heads,
            seq_len=self.seq_len,
            head_dim=self.head_dim,
            architecture=self.architecture,
        )


def layer_file(kind: str, layer: int) -> str:
    return f"{kind}_{layer:02d}.bin"


def requested_directory(raw: str | None) -> Path | None:
    """A request's ``dir`` as an absolute path (``~`` expanded), or None.
    A NUL character, or a ``~user`` with no such user, is a ``BadDirectory``."""
    if raw is None:
        return None
    if "\0" in raw:
        raise BadDirectory("must not contain a NUL character")
    try:
        return Path(raw).expanduser().absolute()
    except RuntimeError as exc:  # "Could not determine home directory."
        raise BadDirectory(f"cannot expand {raw[:200]}: {exc}") from None


def output_directory(directory: Path | None) -> Path:
    """``directory``, created if missing, or a new private temporary directory."""
    if directory is None:
        return Path(tempfile.mkdtemp(prefix=DIR_PREFIX))
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadDirectory(f"cannot create {directory}: {exc.strerror or exc}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise BadDirectory(f"{directory} is not writable")
    return directory


def save_capture(capture: AttentionCapture, layers: Iterable[tuple[bytes, bytes]]) -> None:
    """Write each layer's (queries, keys) float32 bytes, then ``inspect.json``,
    into ``capture.directory`` (which must exist)."""
    directory = capture.directory
    for i, (queries, keys) in enumerate(layers):
        (directory / layer_file("queries", i)).write_bytes(queries)
        (directory / layer_file("keys", i)).write_bytes(keys)
    (directory / "inspect.json").write_text(json.dumps(capture.layout(), indent=2) + "\n")


def wire_error(exc: InspectError, request_id: RequestId | None) -> InvalidRequest:
    """An ``inspect`` that cannot be served, as the ``invalid_request`` the
    host gets: it names the field at fault (``prompt``, ``dir``), or ``cmd``
    when the loaded model is one this capture does not understand."""
    if isinstance(exc, EmptyPrompt):
        message = "prompt: encodes to zero tokens"
    elif isinstance(exc, BadDirectory):
        message = f"dir: {exc}"
    else:
        message = f"cmd: inspect cannot capture this model's attention: {exc}"
    return InvalidRequest(message, request_id=request_id)


def capture_attention(
    model: Any,
    tokens: Sequence[int],
    *,
    architecture: str,
    directory: Path | None = None,
) -> AttentionCapture:
    """Run one prefill of ``tokens`` through an mlx-lm ``model`` and write
    every layer's queries and keys into ``directory`` (created if missing;
    a new private temporary directory when None)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models.cache import make_prompt_cache

    if sys.byteorder != "little":  # MLX runs on little-endian machines only
        raise InspectError("inspect writes little-endian data and needs a little-endian host")
    if not tokens:
        raise EmptyPrompt("the prompt encodes to zero tokens")

    class Recorder(nn.Module):  # type: ignore[misc]
        """Stands in for an attention module's ``rope`` and keeps its outputs."""

        def __init__(self, rope: Any) -> None:
            super().__init__()
            self.inner = rope
            self.outputs: list[Any] = []

        def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
            out = self.inner(x, *args, **kwargs)
            self.outputs.append(out)
            return out

    attentions = [_attention_of(layer, i) for i, layer in enumerate(_layers(model))]
    recorders = []
    for i, attn in enumerate(attentions):
        if "rope" not in attn:
            raise InspectError(f"layer {i}: its attention has no rope module to record")
        recorders.append(Recorder(attn["rope"]))
    try:
        for attn, recorder in zip(attentions, recorders, strict=True):
            attn["rope"] = recorder
        cache = make_prompt_cache(model)
        model(mx.array([list(tokens)]), cache=cache)
        captured = [recorder.outputs for recorder in recorders]
        mx.eval([a for outputs in captured for a in outputs])
    finally:
        for attn, recorder in zip(attentions, recorders, strict=True):
            attn["rope"] = recorder.inner

    pairs = [_queries_and_keys(i, outputs, len(tokens)) for i, outputs in enumerate(captured)]
    q0, k0 = pairs[0]
    for i, (q, k) in enumerate(pairs):
        if q.shape != q0.shape or k.shape != k0.shape:
            raise InspectError(
                f"layer {i}: shapes {q.shape}/{k.shape} differ from layer 0's "
                f"{q0.shape}/{k0.shape}; per-layer shapes are not supported"
            )
    result = AttentionCapture(
        directory=output_directory(directory),
        num_layers=len(pairs),
        num_q_heads=int(q0.shape[1]),
        num_kv_heads=int(k0.shape[1]),
        seq_len=int(q0.shape[2]),
        head_dim=int(q0.shape[3]),
        architecture=architecture,
    )
    save_capture(result, ((_float32_bytes(q), _float32_bytes(k)) for q, k in pairs))
    return result


def _layers(model: Any) -> list[Any]:
    for owner in (model, getattr(model, "model", None), getattr(model, "language_model", None)):
        layers = getattr(owner, "layers", None) if owner is not None else None
        if layers:
            return list(layers)
    raise InspectError("the model has no transformer layers to inspect")


def _attention_of(layer: Any, index: int) -> Any:
    for name in ATTENTION_NAMES:
        if name in layer:
            return layer[name]
    raise InspectError(f"layer {index}: no attention module ({', '.join(ATTENTION_NAMES)})")


def _queries_and_keys(index: int, outputs: list[Any], seq_len: int) -> tuple[Any, Any]:
    """The two recorded rope outputs, checked: ``[1, heads, seq_len, head_dim]``."""
    if len(outputs) != 2:
        raise InspectError(
            f"layer {index}: rope ran {len(outputs)} times in one pass, expected 2 "
            "(queries, then keys)"
        )
    queries, keys = outputs
    for name, a in (("queries", queries), ("keys", keys)):
        if a.ndim != 4 or a.shape[0] != 1 or a.shape[2] != seq_len:
            raise InspectError(
                f"layer {index}: {name} have shape {tuple(a.shape)}, "
                f"expected [1, heads, {seq_len}, head_dim]"
            )
    if queries.shape[3] != keys.shape[3] or queries.shape[1] % keys.shape[1]:
        raise InspectError(
            f"layer {index}: queries {tuple(queries.shape)} and keys {tuple(keys.shape)} "
            "do not fit grouped-query attention"
        )
    return queries, keys


def _float32_bytes(a: Any) -> bytes:
    import mlx.core as mx

    flat = a[0].astype(mx.float32)
    mx.eval(flat)
    return bytes(memoryview(flat))


def inspect_prompt(
    model: Any,
    tokenizer: Any,
    prompt: str,
    *,
    architecture: str,
    directory: Path | None = None,
) -> AttentionCapture:
    """Tokenize ``prompt`` as ``generate`` does (BOS added unless the prompt
    starts with it) and capture its attention queries and keys."""
    tokens = encode_prompt(tokenizer, prompt)
    return capture_attention(model, tokens, architecture=architecture, directory=directory)
