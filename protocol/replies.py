"""Replies and events: what the worker writes, one JSON object per line.

Every line has a ``type`` and, when it answers an addressed request, that
request's ``id``. The legacy go-mlx keys are part of the same shapes
(``ok``, ``token``/``token_id``, ``done``, ``error``), so one encoder serves
both dialects: a legacy reply is an addressed reply without ``id``.

Terminal lines end a request: every type except ``token`` and ``progress``
(``NON_TERMINAL_TYPES``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .errors import RankFailed, RequestId, WireError
from .fields import JsonValue

FINISH_REASONS = ("stop", "length", "stop_sequence", "cancelled")
# The reply types that do not end a request: a stream's tokens, and the
# progress events of a request that asked for them.
NON_TERMINAL_TYPES = frozenset({"token", "progress"})
# ``ProgressEvent.stage`` values, and the steps of a ``load``'s progress.
PROGRESS_STAGES = ("prefill", "load")
LOAD_STEPS = ("checking", "weights", "tokenizer", "ready")

Wire = dict[str, JsonValue]


def _envelope(kind: str, request_id: RequestId | None) -> Wire:
    out: Wire = {"type": kind}
    if request_id is not None:
        out["id"] = request_id
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class HelloReply:
    """``limits`` maps names to integers: ``max_line_bytes`` and the other
    request bounds, and from workers that batch ``max_concurrency``
    (sequences decoded together) and ``prefill_chunk_tokens`` (prompt tokens
    per prefill chunk); a host reads the keys it knows."""

    id: RequestId | None = None
    protocol_version: int
    versions: Mapping[str, str]
    commands: tuple[str, ...]
    sampling_options: tuple[str, ...]
    limits: Mapping[str, int]
    pid: int
    model: str | None = None

    def to_wire(self) -> Wire:
        return _envelope("hello", self.id) | {
            "ok": True,
            "protocol_version": self.protocol_version,
            "versions": dict(self.versions),
            "commands": list(self.commands),
            "sampling_options": list(self.sampling_options),
            "limits": dict(self.limits),
            "pid": self.pid,
            "model": self.model,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Pong:
    id: RequestId | None = None

    def to_wire(self) -> Wire:
        return _envelope("pong", self.id) | {"ok": True}


@dataclass(frozen=True, slots=True, kw_only=True)
class VisionDetails:
    """What a vision model does with images; part of its model facts."""

    image_processor: str
    image_token: str | None
    image_token_id: int | None
    vision_model_type: str
    vision_layers: int
    vision_hidden_size: int
    patch_size: int | None
    max_images: int
    max_image_bytes: int
    remote_images: bool

    def to_wire(self) -> Wire:
        return {
            "image_processor": self.image_processor,
            "image_token": self.image_token,
            "image_token_id": self.image_token_id,
            "vision_model_type": self.vision_model_type,
            "vision_layers": self.vision_layers,
            "vision_hidden_size": self.vision_hidden_size,
            "patch_size": self.patch_size,
            "max_images": self.max_images,
            "max_image_bytes": self.max_image_bytes,
            "remote_images": self.remote_images,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardRank:
    """One rank of a sharded worker: its process, its device, and the bytes
    its part of the model holds there (MLX's active memory after the load)."""

    rank: int
    pid: int
    host: str
    device: str
    weights_bytes: int

    def to_wire(self) -> Wire:
        return {
            "rank": self.rank,
            "pid": self.pid,
            "host": self.host,
            "device": self.device,
            "weights_bytes": self.weights_bytes,
        }


SHARD_MODES: tuple[str, ...] = ("tensor", "pipeline")


@dataclass(frozen=True, slots=True, kw_only=True)
class Sharding:
    """How a sharded worker splits its model: over ``ranks`` processes of
    ``mx.distributed`` (``backend``), by ``mode`` (one of :data:`SHARD_MODES`)."""

    backend: str
    mode: str
    ranks: tuple[ShardRank, ...]

    def to_wire(self) -> Wire:
        return {
            "backend": self.backend,
            "mode": self.mode,
            "size": len(self.ranks),
            "ranks": [r.to_wire() for r in self.ranks],
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelFacts:
    """What a loaded model is; reported by ``load`` and ``info``.

    ``vision_details`` is set for vision models only, and written only then;
    ``sharding`` for a sharded worker only (``--ranks``), likewise.
    """

    path: str
    model_type: str
    vocab_size: int
    layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    context_len: int | None
    dtype: str
    quantization: Mapping[str, JsonValue] | None
    parameters: int
    vision: bool = False
    vision_details: VisionDetails | None = None
    sharding: Sharding | None = None
    draft: str | None = None  # the draft model's directory, when one is loaded

    def to_wire(self) -> Wire:
        out: Wire = {
            "path": self.path,
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "layers": self.layers,
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "context_len": self.context_len,
            "dtype": self.dtype,
            "quantization": dict(self.quantization) if self.quantization else None,
            "parameters": self.parameters,
            "vision": self.vision,
        }
        if self.vision_details is not None:
            out["vision_details"] = self.vision_details.to_wire()
        if self.sharding is not None:
            out["sharding"] = self.sharding.to_wire()
        if self.draft is not None:
            out["draft"] = self.draft
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Loaded:
    id: RequestId | None = None
    model: ModelFacts
    load_ms: float

    def to_wire(self) -> Wire:
        return (
            _envelope("loaded", self.id)
            | {"ok": True}
            | self.model.to_wire()
            | {"load_ms": round(self.load_ms, 3)}
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Unloaded:
    id: RequestId | None = None
    was_loaded: bool

    def to_wire(self) -> Wire:
        return _envelope("unloaded", self.id) | {"ok": True, "was_loaded": self.was_loaded}


@dataclass(frozen=True, slots=True, kw_only=True)
class TopLogprob:
    token_id: int
    token: str
    logprob: float

    def to_wire(self) -> Wire:
        return {"token_id": self.token_id, "token": self.token, "logprob": self.logprob}


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenEvent:
    """One generated token; ``token`` is its text (may be empty while a
    multi-byte character or a possible stop string is held back)."""

    id: RequestId | None = None
    token: str
    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[TopLogprob, ...] | None = None

    def to_wire(self) -> Wire:
        out = _envelope("token", self.id)
        out["token"] = self.token
        out["token_id"] = self.token_id
        if self.logprob is not None:
            out["logprob"] = self.logprob
        if self.top_logprobs is not None:
            out["top_logprobs"] = [t.to_wire() for t in self.top_logprobs]
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class ProgressEvent:
    """How far a request that asked for it (``progress: true``) has come.

    Not terminal: the request's own reply still ends it. ``stage`` is
    ``prefill`` (``done`` of ``total`` prompt tokens prefilled, cached tokens
    not counted) or ``load`` (``step`` is one of ``LOAD_STEPS``; ``done`` of
    ``total`` counts ``unit``: ``bytes`` or ``files``). ``done``, ``total``
    and ``unit`` are None where they are not known.
    """

    id: RequestId
    stage: str
    done: int | None = None
    total: int | None = None
    unit: str | None = None
    step: str | None = None

    def to_wire(self) -> Wire:
        out = _envelope("progress", self.id)
        out["stage"] = self.stage
        if self.step is not None:
            out["step"] = self.step
        if self.done is not None:
            out["done"] = self.done
        if self.total is not None:
            out["total"] = self.total
        if self.unit is not None:
            out["unit"] = self.unit
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolCall:
    """One tool call parsed out of a chat answer (OpenAI's shape on the wire).

    ``arguments`` is a JSON text, as in OpenAI's API.
    """

    id: str
    name: str
    arguments: str

    def to_wire(self) -> Wire:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Done:
    """The end of a generation.

    ``cached_tokens`` of the ``prompt_tokens`` came from the prompt cache.
    ``tool_calls`` and ``content`` are set together, only when tool calls were
    parsed out of the answer: ``content`` is the answer's text without them.
    """

    id: RequestId | None = None
    finish_reason: str
    tokens_generated: int
    prompt_tokens: int
    prompt_tps: float
    generation_tps: float
    ttft_ms: float | None
    queue_ms: float = 0.0
    peak_memory_bytes: int
    cached_tokens: int = 0
    tool_calls: tuple[ToolCall, ...] | None = None
    content: str | None = None
    # With a draft model loaded: the answer's tokens the draft proposed and
    # the model accepted (0 when the request decoded without it).
    draft_tokens_accepted: int | None = None

    def to_wire(self) -> Wire:
        out = _envelope("done", self.id) | {
            "done": True,
            "finish_reason": self.finish_reason,
            "tokens_generated": self.tokens_generated,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "prompt_tps": round(self.prompt_tps, 3),
            "generation_tps": round(self.generation_tps, 3),
            "ttft_ms": None if self.ttft_ms is None else round(self.ttft_ms, 3),
            "queue_ms": round(self.queue_ms, 3),
            "peak_memory_bytes": self.peak_memory_bytes,
        }
        if self.tool_calls is not None:
            out["tool_calls"] = [call.to_wire() for call in self.tool_calls]
            out["content"] = self.content or ""
        if self.draft_tokens_accepted is not None:
            out["draft_tokens_accepted"] = self.draft_tokens_accepted
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class PromptCacheStats:
    """The worker's prompt cache: KV caches kept for reuse by later requests."""

    entries: int
    bytes: int
    max_entries: int
    max_bytes: int

    def to_wire(self) -> Wire:
        return {
            "entries": self.entries,
            "bytes": self.bytes,
            "max_entries": self.max_entries,
            "max_bytes": self.max_bytes,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class RankMemory:
    """One rank's memory now (a sharded worker's ``info``)."""

    rank: int
    active_bytes: int
    peak_bytes: int
    cache_bytes: int
    rss_bytes: int

    def to_wire(self) -> Wire:
        return {
            "rank": self.rank,
            "active_bytes": self.active_bytes,
            "peak_bytes": self.peak_bytes,
            "cache_bytes": self.cache_bytes,
            "rss_bytes": self.rss_bytes,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryStats:
    """This process's memory (rank 0's, on a sharded worker, which adds
    ``ranks``: every rank's, rank 0 first)."""

    active_bytes: int
    peak_bytes: int
    cache_bytes: int
    rss_bytes: int
    # Engines without a prompt cache (the scripted one) leave it out.
    prompt_cache: PromptCacheStats | None = None
    ranks: tuple[RankMemory, ...] | None = None

    def to_wire(self) -> Wire:
        out: Wire = {
            "active_bytes": self.active_bytes,
            "peak_bytes": self.peak_bytes,
            "cache_bytes": self.cache_bytes,
            "rss_bytes": self.rss_bytes,
        }
        if self.prompt_cache is not None:
            out["prompt_cache"] = self.prompt_cache.to_wire()
        if self.ranks is not None:
            out["ranks"] = [r.to_wire() for r in self.ranks]
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchStats:
    """The decode batch: sequences ``running`` (decoding) and ``prefilling``
    (admitted, prompt not yet done), requests ``queued`` for admission, the
    cap ``max_concurrency``, the KV-cache bytes reserved by admitted
    sequences against ``kv_budget_bytes`` (None: no budget), decode
    ``steps`` so far, the last one's time, and the tokens per second of all
    sequences together."""

    running: int
    prefilling: int
    queued: int
    max_concurrency: int
    kv_reserved_bytes: int
    kv_budget_bytes: int | None
    steps: int
    last_step_ms: float
    tokens_per_s: float

    def to_wire(self) -> Wire:
        return {
            "running": self.running,
            "prefilling": self.prefilling,
            "queued": self.queued,
            "max_concurrency": self.max_concurrency,
            "kv_reserved_bytes": self.kv_reserved_bytes,
            "kv_budget_bytes": self.kv_budget_bytes,
            "steps": self.steps,
            "last_step_ms": round(self.last_step_ms, 3),
            "tokens_per_s": round(self.tokens_per_s, 3),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class InfoReply:
    """``batch`` is written only when set (workers that batch)."""

    id: RequestId | None = None
    model: ModelFacts
    memory: MemoryStats
    batch: BatchStats | None = None

    def to_wire(self) -> Wire:
        out = (
            _envelope("info", self.id)
            | {"ok": True}
            | self.model.to_wire()
            | {"memory": self.memory.to_wire()}
        )
        if self.batch is not None:
            out["batch"] = self.batch.to_wire()
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class TokensReply:
    id: RequestId | None = None
    tokens: tuple[int, ...]

    def to_wire(self) -> Wire:
        return _envelope("tokens", self.id) | {"ok": True, "tokens": list(self.tokens)}


@dataclass(frozen=True, slots=True, kw_only=True)
class TextReply:
    id: RequestId | None = None
    text: str

    def to_wire(self) -> Wire:
        return _envelope("text", self.id) | {"ok": True, "text": self.text}


@dataclass(frozen=True, slots=True, kw_only=True)
class AttentionFacts:
    """Where ``inspect`` wrote a prompt's attention queries and keys, and their shapes.

    ``dir`` holds ``queries_NN.bin`` (``[num_q_heads, seq_len, head_dim]``) and
    ``keys_NN.bin`` (``[num_kv_heads, seq_len, head_dim]``), little-endian
    float32 in C order, for each layer ``NN`` below ``num_layers``, plus
    ``inspect.json``.
    """

    dir: str
    num_layers: int
    num_kv_heads: int
    num_q_heads: int
    seq_len: int
    head_dim: int
    architecture: str

    def to_wire(self) -> Wire:
        return {
            "dir": self.dir,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "num_q_heads": self.num_q_heads,
            "seq_len": self.seq_len,
            "head_dim": self.head_dim,
            "architecture": self.architecture,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Inspected:
    """Answer to ``inspect``: go-mlx's legacy reply keys, plus ``type`` and ``id``."""

    id: RequestId | None = None
    attention: AttentionFacts

    def to_wire(self) -> Wire:
        return _envelope("inspected", self.id) | {"ok": True} | self.attention.to_wire()


@dataclass(frozen=True, slots=True, kw_only=True)
class Bye:
    """Answer to an addressed ``quit``, written after every other terminal line."""

    id: RequestId | None = None

    def to_wire(self) -> Wire:
        return _envelope("bye", self.id) | {"ok": True}


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorReply:
    """``rank``, ``exit_code`` and ``stderr_tail`` come with ``rank_failed``
    only (the rank of a sharded worker that died), and are written only then."""

    id: RequestId | None = None
    code: str
    message: str
    rank: int | None = None
    exit_code: int | None = None
    stderr_tail: str | None = None

    @classmethod
    def of(cls, error: WireError, request_id: RequestId | None = None) -> ErrorReply:
        rid = request_id if request_id is not None else error.request_id
        if isinstance(error, RankFailed):
            return cls(
                id=rid,
                code=error.code,
                message=error.message,
                rank=error.rank,
                exit_code=error.exit_code,
                stderr_tail=error.stderr_tail,
            )
        return cls(id=rid, code=error.code, message=error.message)

    def to_wire(self) -> Wire:
        out = _envelope("error", self.id) | {"error": self.message, "code": self.code}
        if self.rank is not None:
            out["rank"] = self.rank
            out["exit_code"] = self.exit_code
            out["stderr_tail"] = self.stderr_tail or ""
        return out


Reply = (
    HelloReply
    | Pong
    | Loaded
    | Unloaded
    | TokenEvent
    | ProgressEvent
    | Done
    | InfoReply
    | TokensReply
    | TextReply
    | Inspected
    | Bye
    | ErrorReply
)
