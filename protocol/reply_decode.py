"""Replies back into types: one decoded JSON object in, one reply dataclass out.

The inverse of :meth:`Reply.to_wire <protocol.replies.Reply>`, for hosts
written in Python (``supervisor``) and for tests. ``parse_reply`` picks the
class by ``type`` and reads every field through :class:`~protocol.fields.Fields`.

Errors: both are :class:`~protocol.errors.WireError`, so a caller that only
wants "this line is not a valid reply" catches ``WireError``.

- :class:`~protocol.errors.InvalidJson` when the value is not a JSON object;
- :class:`~protocol.errors.InvalidRequest` (code ``invalid_request``: the
  protocol has no separate code for a bad *reply*) when ``type`` is missing or
  unknown, or a field is missing or of the wrong type. The message names the
  field the way request errors do, prefixed with the reply type:
  ``done.tokens_generated: required``.

Fields the dataclass gives a default are optional here; unknown fields are
ignored, so replies from newer workers still decode.
"""

from __future__ import annotations

from collections.abc import Callable

from .errors import InvalidJson, InvalidRequest, RequestId
from .fields import Fields, JsonValue, describe
from .replies import (
    AttentionFacts,
    BatchStats,
    Bye,
    Done,
    ErrorReply,
    HelloReply,
    InfoReply,
    Inspected,
    Loaded,
    MemoryStats,
    ModelFacts,
    Pong,
    ProgressEvent,
    PromptCacheStats,
    RankMemory,
    Reply,
    Sharding,
    ShardRank,
    TextReply,
    TokenEvent,
    TokensReply,
    ToolCall,
    TopLogprob,
    Unloaded,
    VisionDetails,
)
from .requests import parse_request_id

__all__ = ["REPLY_TYPES", "parse_reply"]


def parse_reply(obj: object) -> Reply:
    """Decode one JSON value (already parsed) into a reply dataclass."""
    if not isinstance(obj, dict):
        raise InvalidJson(f"a reply must be a JSON object, got {describe(obj)}")
    rid = parse_request_id(obj)  # the same rule as for requests
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise InvalidRequest(
            "type: required" if kind is None else f"type: must be a string, got {describe(kind)}",
            request_id=rid,
        )
    parser = _PARSERS.get(kind)
    if parser is None:
        raise InvalidRequest(
            f"type: unknown reply type {kind!r}; known: {', '.join(REPLY_TYPES)}", request_id=rid
        )
    return parser(Fields(obj, prefix=f"{kind}.", request_id=rid), rid)


# -- typed reads a reply needs beyond Fields -----------------------------------------


def _int(f: Fields, key: str) -> int:
    if not f.has(key):
        raise f.fail(key, "required")
    value = f.int_(key)
    assert value is not None
    return value


def _float(f: Fields, key: str) -> float:
    if not f.has(key):
        raise f.fail(key, "required")
    return f.number(key, 0.0)


def _bool(f: Fields, key: str) -> bool:
    if not f.has(key):
        raise f.fail(key, "required")
    return f.bool_(key, False)


def _optional_float(f: Fields, key: str) -> float | None:
    return f.number(key, 0.0) if f.has(key) else None


def _str_tuple(f: Fields, key: str) -> tuple[str, ...]:
    items = f.list_(key, required=True) or []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise f.fail(f"{key}[{i}]", f"must be a string, got {describe(item)}")
    return tuple(items)  # type: ignore[arg-type]


def _mapping(f: Fields, key: str, kind: type, what: str) -> dict[str, JsonValue]:
    value = f.object_(key)
    if value is None:
        raise f.fail(key, "required")
    for name, item in value.items():
        if isinstance(item, bool) or not isinstance(item, kind):
            raise f.fail(f"{key}.{name}", f"must be {what}, got {describe(item)}")
    return value  # type: ignore[return-value]


# -- one parser per reply type --------------------------------------------------------


def _vision_details(f: Fields | None) -> VisionDetails | None:
    if f is None:
        return None
    return VisionDetails(
        image_processor=f.required_str("image_processor"),
        image_token=f.str_("image_token"),
        image_token_id=f.int_("image_token_id"),
        vision_model_type=f.required_str("vision_model_type"),
        vision_layers=_int(f, "vision_layers"),
        vision_hidden_size=_int(f, "vision_hidden_size"),
        patch_size=f.int_("patch_size"),
        max_images=_int(f, "max_images"),
        max_image_bytes=_int(f, "max_image_bytes"),
        remote_images=_bool(f, "remote_images"),
    )


def _sharding(f: Fields | None) -> Sharding | None:
    if f is None:
        return None
    ranks = []
    for r in f.objects("ranks", required=True) or []:
        ranks.append(
            ShardRank(
                rank=_int(r, "rank"),
                pid=_int(r, "pid"),
                host=r.required_str("host"),
                device=r.required_str("device"),
                weights_bytes=_int(r, "weights_bytes"),
            )
        )
    return Sharding(
        backend=f.required_str("backend"), mode=f.required_str("mode"), ranks=tuple(ranks)
    )


def _rank_memory(m: Fields) -> tuple[RankMemory, ...] | None:
    ranks = m.objects("ranks")
    if ranks is None:
        return None
    return tuple(
        RankMemory(
            rank=_int(r, "rank"),
            active_bytes=_int(r, "active_bytes"),
            peak_bytes=_int(r, "peak_bytes"),
            cache_bytes=_int(r, "cache_bytes"),
            rss_bytes=_int(r, "rss_bytes"),
        )
        for r in ranks
    )


def _facts(f: Fields) -> ModelFacts:
    return ModelFacts(
        path=f.required_str("path"),
        model_type=f.required_str("model_type"),
        vocab_size=_int(f, "vocab_size"),
        layers=_int(f, "layers"),
        hidden_size=_int(f, "hidden_size"),
        num_attention_heads=_int(f, "num_attention_heads"),
        num_key_value_heads=_int(f, "num_key_value_heads"),
        head_dim=_int(f, "head_dim"),
        context_len=f.int_("context_len"),
        dtype=f.required_str("dtype"),
        quantization=f.object_("quantization"),  # type: ignore[arg-type]
        parameters=_int(f, "parameters"),
        vision=f.bool_("vision", False),
        vision_details=_vision_details(f.child("vision_details")),
        sharding=_sharding(f.child("sharding")),
        draft=f.str_("draft"),
    )


def _hello(f: Fields, rid: RequestId | None) -> HelloReply:
    return HelloReply(
        id=rid,
        protocol_version=_int(f, "protocol_version"),
        versions=_mapping(f, "versions", str, "a string"),  # type: ignore[arg-type]
        commands=_str_tuple(f, "commands"),
        sampling_options=_str_tuple(f, "sampling_options"),
        limits=_mapping(f, "limits", int, "an integer"),  # type: ignore[arg-type]
        pid=_int(f, "pid"),
        model=f.str_("model"),
    )


def _loaded(f: Fields, rid: RequestId | None) -> Loaded:
    return Loaded(id=rid, model=_facts(f), load_ms=_float(f, "load_ms"))


def _top_logprobs(f: Fields) -> tuple[TopLogprob, ...] | None:
    items = f.objects("top_logprobs")
    if items is None:
        return None
    return tuple(
        TopLogprob(
            token_id=_int(t, "token_id"),
            token=t.required_str("token"),
            logprob=_float(t, "logprob"),
        )
        for t in items
    )


def _token(f: Fields, rid: RequestId | None) -> TokenEvent:
    return TokenEvent(
        id=rid,
        token=f.required_str("token"),
        token_id=_int(f, "token_id"),
        logprob=_optional_float(f, "logprob"),
        top_logprobs=_top_logprobs(f),
    )


def _progress(f: Fields, rid: RequestId | None) -> ProgressEvent:
    if rid is None:
        raise f.fail("id", "required (only an addressed request is sent progress)")
    return ProgressEvent(
        id=rid,
        stage=f.required_str("stage", nonempty=True),
        step=f.str_("step"),
        done=f.int_("done", minimum=0),
        total=f.int_("total", minimum=0),
        unit=f.str_("unit"),
    )


def _tool_calls(f: Fields) -> tuple[ToolCall, ...] | None:
    items = f.objects("tool_calls")
    if items is None:
        return None
    out: list[ToolCall] = []
    for call in items:
        function = call.required_child("function")
        out.append(
            ToolCall(
                id=call.required_str("id"),
                name=function.required_str("name"),
                arguments=function.required_str("arguments"),
            )
        )
    return tuple(out)


def _done(f: Fields, rid: RequestId | None) -> Done:
    return Done(
        id=rid,
        finish_reason=f.required_str("finish_reason"),
        tokens_generated=_int(f, "tokens_generated"),
        prompt_tokens=_int(f, "prompt_tokens"),
        prompt_tps=_float(f, "prompt_tps"),
        generation_tps=_float(f, "generation_tps"),
        ttft_ms=_optional_float(f, "ttft_ms"),
        queue_ms=f.number("queue_ms", 0.0),
        peak_memory_bytes=_int(f, "peak_memory_bytes"),
        cached_tokens=f.int_("cached_tokens", 0) or 0,
        tool_calls=_tool_calls(f),
        content=f.str_("content"),
        draft_tokens_accepted=f.int_("draft_tokens_accepted", minimum=0),
    )


def _info(f: Fields, rid: RequestId | None) -> InfoReply:
    m = f.required_child("memory")
    cache = m.child("prompt_cache")
    memory = MemoryStats(
        active_bytes=_int(m, "active_bytes"),
        peak_bytes=_int(m, "peak_bytes"),
        cache_bytes=_int(m, "cache_bytes"),
        rss_bytes=_int(m, "rss_bytes"),
        prompt_cache=None
        if cache is None
        else PromptCacheStats(
            entries=_int(cache, "entries"),
            bytes=_int(cache, "bytes"),
            max_entries=_int(cache, "max_entries"),
            max_bytes=_int(cache, "max_bytes"),
        ),
        ranks=_rank_memory(m),
    )
    return InfoReply(id=rid, model=_facts(f), memory=memory, batch=_batch(f.child("batch")))


def _batch(b: Fields | None) -> BatchStats | None:
    if b is None:
        return None
    return BatchStats(
        running=_count(b, "running"),
        prefilling=_count(b, "prefilling"),
        queued=_count(b, "queued"),
        max_concurrency=_count(b, "max_concurrency"),
        kv_reserved_bytes=_count(b, "kv_reserved_bytes"),
        kv_budget_bytes=b.int_("kv_budget_bytes", minimum=0),
        steps=_count(b, "steps"),
        last_step_ms=b.number("last_step_ms", 0.0, minimum=0.0),
        tokens_per_s=b.number("tokens_per_s", 0.0, minimum=0.0),
    )


def _count(f: Fields, key: str) -> int:
    """A required integer ≥ 0."""
    if not f.has(key):
        raise f.fail(key, "required")
    value = f.int_(key, minimum=0)
    assert value is not None
    return value


def _inspected(f: Fields, rid: RequestId | None) -> Inspected:
    attention = AttentionFacts(
        dir=f.required_str("dir"),
        num_layers=_int(f, "num_layers"),
        num_kv_heads=_int(f, "num_kv_heads"),
        num_q_heads=_int(f, "num_q_heads"),
        seq_len=_int(f, "seq_len"),
        head_dim=_int(f, "head_dim"),
        architecture=f.required_str("architecture"),
    )
    return Inspected(id=rid, attention=attention)


def _error(f: Fields, rid: RequestId | None) -> ErrorReply:
    code = f.required_str("code")
    if f.has("rank"):
        return ErrorReply(
            id=rid,
            code=code,
            message=f.required_str("error"),
            rank=_int(f, "rank"),
            exit_code=f.int_("exit_code"),
            stderr_tail=f.str_("stderr_tail") or "",
        )
    return ErrorReply(id=rid, code=code, message=f.required_str("error"))


_PARSERS: dict[str, Callable[[Fields, RequestId | None], Reply]] = {
    "hello": _hello,
    "pong": lambda f, rid: Pong(id=rid),
    "loaded": _loaded,
    "unloaded": lambda f, rid: Unloaded(id=rid, was_loaded=_bool(f, "was_loaded")),
    "token": _token,
    "progress": _progress,
    "done": _done,
    "info": _info,
    "tokens": lambda f, rid: TokensReply(id=rid, tokens=f.int_list("tokens", required=True)),
    "text": lambda f, rid: TextReply(id=rid, text=f.required_str("text")),
    "inspected": _inspected,
    "bye": lambda f, rid: Bye(id=rid),
    "error": _error,
}
REPLY_TYPES: tuple[str, ...] = tuple(_PARSERS)
