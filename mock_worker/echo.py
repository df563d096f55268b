"""The scripted model: it echoes the words of the prompt, cyclically.

For ``generate`` the words are the prompt's; for ``chat`` they are those of
the last message's text (text parts joined by spaces). Token ``n`` is word
``n % len(words)``, written with a leading space except the first, so the
streamed text reads ``"a b c a b"``. A word's token id is a stable hash.
The prompt itself is tokenized as its UTF-8 bytes, like ``tokenize``.
"""

from __future__ import annotations

import zlib

from bridge.engines.engine_protocol import Step
from protocol.replies import TopLogprob
from protocol.requests import Chat, ContentPart, Generate, TextPart

VOCAB_SIZE = 32000
EOS_TOKEN_ID = 0


def words_of(request: Generate | Chat) -> tuple[str, ...]:
    match request:
        case Generate():
            return tuple(request.prompt.split())
        case Chat():
            return tuple(_text(request.messages[-1].content).split())


def prompt_text(request: Generate | Chat) -> str:
    """The text the prompt tokens are the bytes of (a chat as a plain transcript)."""
    match request:
        case Generate():
            return request.prompt
        case Chat():
            lines = [f"{m.role}: {_text(m.content)}\n" for m in request.messages]
            return "".join(lines) + "assistant: "


def token_id(word: str) -> int:
    """A stable id in ``1 .. VOCAB_SIZE - 1`` (0 is EOS)."""
    return 1 + zlib.crc32(word.encode()) % (VOCAB_SIZE - 1)


def token_steps(words: tuple[str, ...], top_n: int) -> tuple[Step, ...]:
    """One step per word, each text with its leading space (the first token of
    a generation drops it). With ``top_n``, logprobs: the chosen word at 0,
    then the next words of the cycle at -1, -2, ..."""
    ids = tuple(token_id(w) for w in words)
    steps = []
    for i, word in enumerate(words):
        top = tuple(
            TopLogprob(
                token_id=ids[(i + k) % len(words)],
                token=words[(i + k) % len(words)],
                logprob=-float(k),
            )
            for k in range(top_n)
        )
        steps.append(
            Step(
                text=" " + word,
                token_id=ids[i],
                logprob=0.0 if top_n else None,
                top_logprobs=top if top_n else None,
            )
        )
    return tuple(steps)


def _text(content: str | tuple[ContentPart, ...] | None) -> str:
    if isinstance(content, tuple):
        return " ".join(p.text for p in content if isinstance(p, TextPart))
    return content or ""
