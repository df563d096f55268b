"""How long a prompt may be: the model's context and the worker's cap, checked before prefill.

Both engines call this from ``prepare``, so a prompt that cannot fit is
refused with ``context_length_exceeded`` before any prefill starts:

- A prompt must leave room for one generated token: at most
  ``context_len - 1`` tokens, where ``context_len`` is the load's
  ``context_len``, else the model's ``max_position_embeddings``
  (``ModelFacts.context_len``). A model that states neither has no context
  limit here.
- It must also be within the worker's ``--max-prompt-tokens`` (default
  :data:`DEFAULT_MAX_PROMPT_TOKENS`; ``0`` means no cap), which bounds the
  prefill time and KV-cache memory one request can claim, whatever a model's
  config says its context is.
- ``max_tokens`` past the rest of the context is not an error: generation is
  clamped to ``context_len - prompt_tokens`` tokens and ends with
  ``finish_reason: "length"``.

Tokenizing costs about 1 µs per character (13 s for 10 MB with the fixture
tokenizer), so a long text is not tokenized whole just to be refused:
:meth:`ContextLimits.encode` first tokenizes a prefix (cut at a space) and
refuses as soon as a prefix alone has more tokens than the limit. The
prefix grows fourfold until it is the whole text, so a prompt that fits
costs at most a third more than one tokenization, and one that does not fit
is refused after tokenizing little more than it would take to fill the limit.

No MLX here: it only calls the tokenizer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import orjson

from protocol.errors import ContextLengthExceeded, RequestId
from protocol.requests import Chat, Sampling, TextPart

log = logging.getLogger("bridge.context")

DEFAULT_MAX_PROMPT_TOKENS = 131072
"""128 Ki tokens: the longest context of common open models (Llama 3.1, Gemma 3),
so it never bites below a model's own context, and it bounds the prefill that a
config claiming a far larger (or bogus) context would allow."""

# A prefix is tokenized only when the text has more characters than this many
# per token of the limit (English text runs at about 4).
CHARS_PER_TOKEN = 4

# Tokens a prefix may have beyond the whole text's, because its cut can split
# what the whole text encodes as one pre-token.
CUT_MARGIN = 8

# How far back from the wanted cut a space is looked for.
CUT_SEARCH = 256

Encode = Callable[[str], list[int]]


@dataclass(frozen=True, slots=True, kw_only=True)
class ContextLimits:
    """The limits of one loaded model under one worker's flags."""

    context_len: int | None
    max_prompt_tokens: int | None = DEFAULT_MAX_PROMPT_TOKENS

    @property
    def prompt_limit(self) -> int | None:
        """The most prompt tokens a request may have, or None for no limit."""
        limits = []
        if self.context_len is not None:
            limits.append(max(self.context_len - 1, 0))
        if self.max_prompt_tokens:
            limits.append(self.max_prompt_tokens)
        return min(limits) if limits else None

    def worth_prechecking(self, chars: int) -> bool:
        """Whether a text of ``chars`` characters is long enough for
        :meth:`precheck` to tokenize a prefix of it."""
        limit = self.prompt_limit
        return limit is not None and chars > CHARS_PER_TOKEN * (limit + CUT_MARGIN)

    def encode(
        self,
        encode: Encode,
        text: str,
        *,
        field: str,
        sampling: Sampling,
        request_id: RequestId | None,
    ) -> list[int]:
        """``encode(text)``, or ``context_length_exceeded`` as soon as a prefix
        of ``text`` proves that it has too many tokens."""
        self.precheck(encode, text, field=field, sampling=sampling, request_id=request_id)
        return encode(text)

    def precheck(
        self,
        encode: Encode,
        text: str,
        *,
        field: str,
        sampling: Sampling,
        request_id: RequestId | None,
    ) -> None:
        """Refuse ``text`` if a prefix of it already has too many tokens; does
        nothing (tokenizes nothing) for a text short enough to tokenize whole.

        A lower bound for prompts built from ``text`` plus more (a chat
        template's markers, a vision model's image tokens)."""
        limit = self.prompt_limit
        if limit is None:
            return
        size = CHARS_PER_TOKEN * (limit + CUT_MARGIN)
        while size < len(text):
            cut = _cut(text, size)
            counted = len(encode(text[:cut]))
            if counted > limit + CUT_MARGIN:
                raise self.refusal(
                    counted - CUT_MARGIN,
                    field=field,
                    sampling=sampling,
                    request_id=request_id,
                    counted=f"counted in its first {cut} of {len(text)} characters; ",
                )
            size *= 4

    def check(
        self,
        prompt_tokens: int,
        *,
        field: str,
        sampling: Sampling,
        request_id: RequestId | None,
    ) -> Sampling:
        """Refuse a prompt of ``prompt_tokens`` that is over a limit; otherwise
        ``sampling`` with ``max_tokens`` clamped to the rest of the context."""
        limit = self.prompt_limit
        if limit is not None and prompt_tokens > limit:
            raise self.refusal(prompt_tokens, field=field, sampling=sampling, request_id=request_id)
        if self.context_len is None:
            return sampling
        room = self.context_len - prompt_tokens
        if sampling.max_tokens <= room:
            return sampling
        log.info(
            "max_tokens %d clamped to %d: %d prompt tokens, context length %d",
            sampling.max_tokens,
            room,
            prompt_tokens,
            self.context_len,
        )
        return replace(sampling, max_tokens=room)

    def refusal(
        self,
        prompt_tokens: int,
        *,
        field: str,
        sampling: Sampling,
        request_id: RequestId | None,
        counted: str = "",
    ) -> ContextLengthExceeded:
        count = f"at least {prompt_tokens}" if counted else str(prompt_tokens)
        context = self.context_len
        cap = self.max_prompt_tokens
        stated = f"{count} prompt tokens ({counted}max_tokens {sampling.max_tokens})"
        if context is not None and (not cap or context - 1 <= cap):
            return ContextLengthExceeded(
                f"{field}: {stated} do not fit the context length of {context} tokens; "
                f"a prompt may have at most {max(context - 1, 0)} tokens, "
                "leaving room for one generated token",
                request_id=request_id,
            )
        context_text = f"{context} tokens" if context is not None else "not stated by the model"
        return ContextLengthExceeded(
            f"{field}: {stated} are over this worker's cap of {cap} prompt tokens "
            f"(--max-prompt-tokens); the context length is {context_text}",
            request_id=request_id,
        )


def chat_chars(request: Chat) -> int:
    """About how many characters a chat template renders from ``request``, at
    least (its contents, tool calls and tools), without rendering it."""
    chars = 0
    for message in request.messages:
        content = message.content
        if isinstance(content, str):
            chars += len(content)
        elif content is not None:
            chars += sum(len(p.text) for p in content if isinstance(p, TextPart))
        if message.tool_calls is not None:
            chars += len(orjson.dumps(message.tool_calls))
    if request.tools:
        chars += len(orjson.dumps(request.tools))
    return chars


def _cut(text: str, size: int) -> int:
    """An index near ``size`` where ``text`` has a space, so that the prefix
    does not end inside a word (or a special token's text)."""
    space = text.rfind(" ", max(size - CUT_SEARCH, 0), size)
    return space if space > 0 else size
