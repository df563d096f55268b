"""protocol.reply_decode: every reply decodes back to what encoded it; bad fields are named."""

from __future__ import annotations

import dataclasses

import pytest

from protocol.errors import InvalidJson, InvalidRequest, WireError
from protocol.replies import (
    AttentionFacts,
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
    PromptCacheStats,
    Reply,
    TextReply,
    TokenEvent,
    TokensReply,
    ToolCall,
    TopLogprob,
    Unloaded,
    VisionDetails,
)
from protocol.reply_decode import parse_reply

FACTS = ModelFacts(
    path="/m",
    model_type="qwen3",
    vocab_size=2048,
    layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    context_len=None,
    dtype="float32",
    quantization={"bits": 4, "group_size": 64},
    parameters=200_000,
)
VISION_FACTS = dataclasses.replace(
    FACTS,
    vision=True,
    vision_details=VisionDetails(
        image_processor="Qwen2VLImageProcessor",
        image_token="<|image_pad|>",
        image_token_id=151655,
        vision_model_type="qwen2_vl",
        vision_layers=2,
        vision_hidden_size=32,
        patch_size=14,
        max_images=4,
        max_image_bytes=1 << 20,
        remote_images=False,
    ),
)
DONE = Done(
    id=1,
    finish_reason="length",
    tokens_generated=2,
    prompt_tokens=3,
    prompt_tps=10.5,
    generation_tps=20.25,
    ttft_ms=None,
    queue_ms=0.5,
    peak_memory_bytes=1000,
)
EVERY_REPLY: list[Reply] = [
    HelloReply(
        id="h",
        protocol_version=1,
        versions={"bridge": "0.1.0"},
        commands=("hello", "ping"),
        sampling_options=("max_tokens",),
        limits={"max_line_bytes": 100},
        pid=42,
        model=None,
    ),
    Pong(id=1),
    Loaded(id=2, model=FACTS, load_ms=12.5),
    Unloaded(id=3, was_loaded=True),
    TokenEvent(id=4, token=" hi", token_id=7),
    TokenEvent(
        id=4,
        token="x",
        token_id=8,
        logprob=-0.5,
        top_logprobs=(TopLogprob(token_id=8, token="x", logprob=-0.5),),
    ),
    DONE,
    Done(
        id=1,
        finish_reason="stop",
        tokens_generated=5,
        prompt_tokens=30,
        cached_tokens=20,
        prompt_tps=1.5,
        generation_tps=2.5,
        ttft_ms=3.5,
        peak_memory_bytes=7,
        tool_calls=(ToolCall(id="call_1", name="get_weather", arguments='{"city":"Oslo"}'),),
        content="",
    ),
    InfoReply(
        id=5,
        model=FACTS,
        memory=MemoryStats(active_bytes=1, peak_bytes=2, cache_bytes=3, rss_bytes=4),
    ),
    InfoReply(
        id=5,
        model=VISION_FACTS,
        memory=MemoryStats(
            active_bytes=1,
            peak_bytes=2,
            cache_bytes=3,
            rss_bytes=4,
            prompt_cache=PromptCacheStats(entries=1, bytes=2, max_entries=3, max_bytes=4),
        ),
    ),
    TokensReply(id=6, tokens=(1, 2, 3)),
    TextReply(id=7, text="hé"),
    Inspected(
        id="i",
        attention=AttentionFacts(
            dir="/tmp/x",
            num_layers=2,
            num_kv_heads=2,
            num_q_heads=4,
            seq_len=5,
            head_dim=16,
            architecture="qwen3",
        ),
    ),
    Bye(id=8),
    ErrorReply(id=9, code="no_model", message="load first"),
]


# -- reply decoding ------------------------------------------------------------------------


@pytest.mark.parametrize("reply", EVERY_REPLY, ids=lambda r: type(r).__name__)
def test_parse_reply_inverts_to_wire(reply: Reply) -> None:
    assert parse_reply(reply.to_wire()) == reply


@pytest.mark.parametrize(
    ("obj", "error", "message"),
    [
        ([1], InvalidJson, "a reply must be a JSON object"),
        ({"id": 1}, InvalidRequest, "type: required"),
        ({"type": "nope"}, InvalidRequest, "type: unknown reply type 'nope'"),
        (
            {"type": "done", "id": 1, "finish_reason": "stop"},
            InvalidRequest,
            "done.tokens_generated: required",
        ),
        (
            {"type": "token", "token": 3, "token_id": 1},
            InvalidRequest,
            "token.token: must be a string",
        ),
        ({"type": "pong", "id": True}, InvalidRequest, "id: must be a string or an integer"),
    ],
)
def test_parse_reply_names_the_bad_field(obj: object, error: type[WireError], message: str) -> None:
    with pytest.raises(error, match=message.replace("(", r"\(")):
        parse_reply(obj)
