"""Output constrained to a JSON Schema, a regular expression or a Lark grammar, with llguidance.

A request's :class:`~protocol.requests.OutputConstraint` is compiled once per
distinct constraint (:class:`Grammars`, least recently used evicted
first) against the model's own tokenizer, and checked before any token:
what llguidance cannot compile is ``invalid_request`` naming the field and
the problem. Each constrained sequence then gets its own matcher inside a
logits processor (:class:`ConstraintProcessor`), so a constrained request
and unconstrained ones decode in the same batch.

The mask is llguidance's bitmask (one bit per token), filled through its
numpy API, unpacked and applied on the device with plain MLX ops
(:func:`masked`): llguidance's own MLX helper, like outlines' and mlx-vlm's,
is a Metal kernel, which MLX's CPU and CUDA builds do not have. The mask is
filled while the device computes the step's forward pass: the processor
queues the input token it must consume (sampled by the step before), then
the forward pass, and only then waits for the token. In the decode batch a
row's processor runs for its first step only and then hands its matcher to
the batch's mask (:mod:`bridge.engines.text.batch_mask`), which fills every
row's in one call.

When the grammar is complete, the mask leaves only the end-of-sequence
token, so a constrained answer ends with ``finish_reason: stop``; cut off by
``max_tokens`` it ends with ``length`` and need not parse, and a stop string
may cut it anywhere (docs/protocol.md, Structured output).

llguidance is imported lazily; MLX too, on the engine thread.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from protocol.errors import InvalidRequest, RequestId
from protocol.requests import OutputConstraint

if TYPE_CHECKING:
    from mlx_lm.tokenizer_utils import TokenizerWrapper

log = logging.getLogger("bridge.engine.constraints")

MAX_GRAMMARS = 64
# llguidance's JSON compiler: no free whitespace between tokens, so that a
# random or small model cannot spend its tokens on blanks.
JSON_OPTIONS: Any = {"whitespace_flexible": False}


@dataclass(frozen=True, slots=True)
class Compiled:
    """A grammar llguidance accepted: a matcher at its start, which every
    sequence constrained by it copies (building one from the grammar's text
    is the expensive part)."""

    matcher: Any  # llguidance.LLMatcher, never advanced itself
    vocab: int  # the logits' width (may exceed the tokenizer's vocabulary)

    def processor(self, prompt_tokens: int) -> ConstraintProcessor:
        return ConstraintProcessor(self, prompt_tokens)


def grammar_text(constraint: OutputConstraint) -> str:
    """llguidance's grammar for ``constraint`` (not yet checked)."""
    from llguidance import LLMatcher

    match constraint.kind:
        case "json_object":
            return str(
                LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
            )
        case "json_schema":
            return str(
                LLMatcher.grammar_from_json_schema(
                    json.loads(constraint.source), defaults=JSON_OPTIONS
                )
            )
        case "regex":
            return str(LLMatcher.grammar_from_regex(constraint.source))
        case "lark":
            return str(LLMatcher.grammar_from_lark(constraint.source))
    raise ValueError(f"unknown constraint kind {constraint.kind!r}")


class Grammars:
    """Compiled grammars of one loaded model, by the constraint's kind and
    source text (engine thread)."""

    def __init__(
        self, tokenizer: TokenizerWrapper, vocab: int, *, limit: int = MAX_GRAMMARS
    ) -> None:
        self._wrapper = tokenizer
        self._vocab = vocab
        self._limit = limit
        self._tokenizer: Any = None
        self._compiled: OrderedDict[tuple[str, str], Compiled] = OrderedDict()

    def compile(
        self, constraint: OutputConstraint, request_id: RequestId | None = None
    ) -> Compiled:
        """The compiled grammar; ``invalid_request`` naming ``constraint.field``
        if llguidance cannot compile it (whatever it raises: the text is the
        request's, so a failure is the request's, never ``internal``)."""
        from llguidance import LLMatcher

        rid = request_id
        key = (constraint.kind, constraint.source)
        found = self._compiled.get(key)
        if found is not None:
            self._compiled.move_to_end(key)
            return found
        try:
            grammar = grammar_text(constraint)
        except Exception as exc:
            raise InvalidRequest(
                f"{constraint.field}: {_short(str(exc))}", request_id=rid
            ) from None
        tokenizer = self._ll_tokenizer(rid)
        try:
            matcher = LLMatcher(tokenizer, grammar, log_level=0)
            error = matcher.get_error() if matcher.is_error() else ""
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        if error:
            raise InvalidRequest(f"{constraint.field}: {_short(error)}", request_id=rid)
        compiled = Compiled(matcher, self._vocab)
        self._compiled[key] = compiled
        while len(self._compiled) > self._limit:
            self._compiled.popitem(last=False)
        return compiled

    def _ll_tokenizer(self, rid: str | int | None) -> Any:
        if self._tokenizer is None:
            import llguidance.hf

            backend = getattr(self._wrapper, "_tokenizer", self._wrapper)
            eos = sorted(getattr(self._wrapper, "eos_token_ids", ()) or ()) or None
            try:
                self._tokenizer = llguidance.hf.from_tokenizer(
                    backend, n_vocab=self._vocab, eos_token=eos
                )
            except Exception as exc:  # a slow (non-Rust) tokenizer, for one
                raise InvalidRequest(
                    f"response_format: this model's tokenizer cannot drive a grammar "
                    f"({type(exc).__name__}: {exc})",
                    request_id=rid,
                ) from None
        return self._tokenizer


class ConstraintProcessor:
    """One sequence's matcher, as an mlx-lm logits processor.

    Called once per token computed, with the sequence's tokens so far
    (``context``; ``offset`` more are in the KV cache before it, on the
    lane that passes only what it feeds). The tokens past the prompt are the
    answer: the matcher consumes those it has not seen, or rolls back those
    a lane move took away, then masks the logits.

    ``hand_over``, set on the batch lane, is called after the call that
    masked the row's first token in the batch: from then on the batch's
    mask advances :attr:`matcher` (through :meth:`consume`) and masks the
    row, until the row leaves the batch."""

    def __init__(self, compiled: Compiled, prompt_tokens: int) -> None:
        import llguidance.numpy as lln

        self.matcher = compiled.matcher.deep_copy()
        self.vocab = compiled.vocab  # the width llguidance fills a bitmask row to
        self._prompt = prompt_tokens
        self._consumed = 0
        self._bitmask = lln.allocate_token_bitmask(1, compiled.vocab)
        self._fill = lln.fill_next_token_bitmask
        self._broken = False
        self.offset = 0
        self.hand_over: Callable[[ConstraintProcessor], None] | None = None

    def consume(self, tokens: list[int]) -> None:
        """The answer's next ``tokens``, as the sequence was given them."""
        if not self.matcher.is_stopped() and not self.matcher.consume_tokens(tokens):
            if not self._broken:
                # cannot happen with the mask applied; end the answer rather than the batch
                log.error("grammar: %s; ending the answer", self.matcher.get_error())
                self._broken = True
        # once the grammar is complete (stopped), what follows is the end
        self._consumed += len(tokens)

    def __call__(self, context: Any, logits: Any) -> Any:
        import mlx.core as mx

        answer = self.offset + int(context.shape[0]) - self._prompt
        if answer > self._consumed:
            new = context[-(answer - self._consumed) :]
            # queued ahead of the forward pass, so that reading it waits for the step before
            mx.async_eval(new)  # type: ignore[no-untyped-call]
            # the device computes this step while the mask is filled
            mx.async_eval(logits)  # type: ignore[no-untyped-call]
            self.consume(new.tolist())
        elif answer < self._consumed:  # a lane move fed a token again
            self.matcher.rollback(self._consumed - answer)
            self._consumed = answer
        self._fill(self.matcher, self._bitmask, 0)  # an error state leaves only EOS
        out = masked(logits, self._bitmask)
        if self.hand_over is not None:
            hand_over, self.hand_over = self.hand_over, None
            hand_over(self)
        return out


def masked(logits: Any, bitmask: Any) -> Any:
    """``logits`` (rows, …, vocab) with every token a row's bitmask
    (rows, words; llguidance's, one bit per token, little-endian) leaves out
    set to -inf, on the device: only the bitmask is uploaded."""
    import mlx.core as mx

    bits = mx.array(bitmask)
    rows, words = bits.shape
    unpacked = mx.right_shift(bits[:, :, None], _bit_positions()) & 1
    allowed = unpacked.reshape(rows, words * 32)[:, : logits.shape[-1]].astype(mx.bool_)
    shape = (rows,) + (1,) * (logits.ndim - 2) + (allowed.shape[-1],)
    return mx.where(allowed.reshape(shape), logits, -mx.inf)


@cache
def _bit_positions() -> Any:
    """0..31 as int32: the shifts that unpack a bitmask word (evaluated, so
    that no stream of the thread that made it is needed to use it)."""
    import mlx.core as mx

    positions = mx.arange(32, dtype=mx.int32)
    mx.eval(positions)
    return positions


def _short(text: str, limit: int = 500) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
