"""``TokenLines``, the streaming fast path, writes what ``encode`` writes."""

from __future__ import annotations

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.codec import TokenLines, encode
from protocol.replies import TokenEvent

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
IDS = st.none() | st.text(max_size=12) | st.integers(min_value=-(2**63), max_value=2**64 - 1)
# st.text never draws lone surrogates, which orjson refuses and the encoder replaces.
TEXTS = st.text(max_size=40) | st.sampled_from(["\ud800", "a\udfffb", 'é\n\u2028"\\'])
TOKEN_IDS = st.integers(min_value=0, max_value=2**31)


@FAST
@given(IDS, st.lists(st.tuples(TEXTS, TOKEN_IDS), min_size=1, max_size=5))
def test_the_same_bytes_as_the_general_encoder(
    rid: str | int | None, tokens: list[tuple[str, int]]
) -> None:
    lines = TokenLines(rid)  # one instance for a whole stream: its dict is reused
    for text, token_id in tokens:
        assert lines(text, token_id) == encode(TokenEvent(id=rid, token=text, token_id=token_id))


def test_a_legacy_token_line_has_no_id() -> None:
    assert orjson.loads(TokenLines(None)(" hi", 7)) == {
        "type": "token",
        "token": " hi",
        "token_id": 7,
    }


def test_a_lone_surrogate_is_replaced_not_lost() -> None:
    line = TokenLines(3)("a\ud800", 1)
    obj = orjson.loads(line)
    assert obj["id"] == 3 and obj["token_id"] == 1
    assert obj["token"] == "a\ufffd"
