"""A stream's text, token by token, that joins up to exactly ``tokenizer.decode(ids)``.

mlx-lm's streaming detokenizers rebuild the text from the vocabulary
themselves, and drift from the tokenizer's own ``decode``: the BPE one drops
the first token's leading space (``" time time"`` streams as ``"time time"``).
:class:`IncrementalDetokenizer` asks the tokenizer's ``decode`` instead, over
a short window of ids, the way vLLM and text-generation-inference do:

- ids ``[prefix:read]`` were already written; they are decoded again as
  context, so that a decoder that treats the start of a sequence specially
  (SentencePiece strips the first token's space) does so in both decodes;
- a new id is decoded with that context, and the text past the context's is
  the token's text;
- text that may still change is held back: text ending in U+FFFD (a
  character whose bytes have not all arrived yet) and, for tokenizers that
  clean up spaces (``" ,"`` decodes as ``","``), a tail such as ``" "`` or
  ``" n"`` that a later token could rewrite;
- :meth:`finish` decodes every id once and returns what the stream has not
  written yet, so that the stream's text is ``decode(ids)``, whatever the
  decoder does.

Each token costs two ``decode`` calls over a few ids (about 2.5 µs each with
a fast tokenizer), so the token path stays cheap. No MLX here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("bridge.detokenizer")

Decode = Callable[[list[int]], str]

INCOMPLETE = "\ufffd"

# Most ids held back at once: a UTF-8 character has at most 4 bytes, so more
# means text that will never complete (a model writing stray bytes); it is
# written as it is, U+FFFD included, rather than decoded again and again.
MAX_PENDING = 8

# The tails that transformers' clean_up_tokenization can still rewrite once
# more text follows: the proper prefixes of " .", " ?", " !", " ,", " ' ",
# " n't", " 'm", " 's", " 've" and " 're".
_CLEANUP_TAILS = (" ", " '", " n", " n'", " 'v", " 'r")


class IncrementalDetokenizer:
    """The text of a growing list of token ids, as it becomes final.

    ``add(id)`` returns the text that id completes (often the id's own text,
    ``""`` while a character or a clean-up is pending); ``finish()`` returns
    the rest. ``"".join(add(i) for i in ids) + finish() == decode(ids)``.
    """

    __slots__ = ("_decode", "_cleans_spaces", "_ids", "_prefix", "_read", "_prefix_text", "_sent")

    def __init__(self, decode: Decode, *, cleans_spaces: bool = False) -> None:
        self._decode = decode
        self._cleans_spaces = cleans_spaces
        self._ids: list[int] = []
        self._prefix = 0  # ids[prefix:read]: context, already written
        self._read = 0  # ids[read:]: not written yet
        self._prefix_text = ""  # decode(ids[prefix:read])
        self._sent: list[str] = []  # every piece written, for finish()

    @property
    def ids(self) -> list[int]:
        return self._ids

    def add(self, token_id: int) -> str:
        ids = self._ids
        ids.append(token_id)
        text = self._decode(ids[self._prefix :])
        context = self._prefix_text
        settled = text.startswith(context)
        if len(ids) - self._read < MAX_PENDING and (
            not settled
            or text.endswith(INCOMPLETE)
            or (self._cleans_spaces and text.endswith(_CLEANUP_TAILS))
        ):
            return ""
        # (not settled past MAX_PENDING: the decoder rewrote written text, by a
        # rule this module does not know; it cannot be unwritten.)
        piece = text[len(context) :] if settled else ""
        self._prefix = self._read
        self._read = len(ids)
        self._prefix_text = self._decode(ids[self._prefix : self._read])
        if piece:
            self._sent.append(piece)
        return piece

    def finish(self) -> str:
        """The text not written yet, once no more ids will come."""
        ids = self._ids
        if self._read == len(ids):
            return ""
        full = self._decode(ids)
        sent = "".join(self._sent)
        if full.startswith(sent):
            rest = full[len(sent) :]
        else:  # only after a rewrite that add() could not hold back
            log.debug("streamed text is not a prefix of the decoded tokens")
            text = self._decode(ids[self._prefix :])
            context = self._prefix_text
            rest = text[len(context) :] if text.startswith(context) else ""
        self._prefix = self._read = len(ids)
        self._prefix_text = ""
        if rest:
            self._sent.append(rest)
        return rest


def cleans_spaces(tokenizer: Any) -> bool:
    """Whether ``tokenizer.decode`` removes the space in ``"a ,b"`` (transformers'
    ``clean_up_tokenization_spaces``, which it skips for BPE models)."""
    try:
        probe = tokenizer.encode("a ,b", add_special_tokens=False)
        return " ," not in tokenizer.decode(probe)
    except Exception:  # a tokenizer that cannot say: assume it may, and hold tails back
        return True


def for_tokenizer(tokenizer: Any) -> IncrementalDetokenizer:
    """A detokenizer over ``tokenizer.decode`` (special tokens kept, as in ``detokenize``)."""
    return IncrementalDetokenizer(tokenizer.decode, cleans_spaces=cleans_spaces(tokenizer))
