"""The scripted model: it echoes the words of the prompt, cyclically.

For ``generate`` the words are the prompt's; for ``chat`` they are those of
the last message's text (text parts joined by spaces). Token ``n`` is word
``n % len(words)``, written with a leading space except the first, so the
streamed text reads ``"a b c a b"``. A word's token id is a stable hash.
The prompt itself is tokenized as its UTF-8 bytes, like ``tokenize``.
"""

from __future__ import annotations

import zlib

from protocol.requests import Chat, Generate, TextPart

VOCAB_SIZE = 32000
EOS_TOKEN_ID = 0


def words_of(request: Generate | Chat) -> tuple[str, ...]:
    match request:
        case Generate():
            return tuple(request.prompt.split())
        case Chat():
            content = request.messages[-1].content
            if isinstance(content, tuple):
                content = " ".join(p.text for p in content if isinstance(p, TextPart))
            return tuple((content or "").split())


def prompt_text(request: Generate | Chat) -> str:
    """The text the prompt tokens are the bytes of (a chat as a plain transcript)."""
    match request:
        case Generate():
            return request.prompt
        case Chat():
            lines = []
            for m in request.messages:
                content = m.content
                if isinstance(content, tuple):
                    content = " ".join(p.text for p in content if isinstance(p, TextPart))
                lines.append(f"{m.role}: {content or ''}\n")
            return "".join(lines) + "assistant: "


def token_text(words: tuple[str, ...], n: int) -> str:
    word = words[n % len(words)]
    return word if n == 0 else " " + word


def token_id(word: str) -> int:
    """A stable id in ``1 .. VOCAB_SIZE - 1`` (0 is EOS)."""
    return 1 + zlib.crc32(word.encode()) % (VOCAB_SIZE - 1)
