"""Output constrained to a JSON Schema, a regular expression or a Lark grammar, with llguidance.

A request's :class:`~protocol.requests.OutputConstraint` is compiled once per
distinct grammar text (:class:`Grammars`, least recently used evicted
first) against the model's own tokenizer, and checked before any token:
what llguidance cannot compile is ``invalid_request`` naming the field and
the problem. Each constrained sequence then gets its own matcher inside a
logits processor (:class:`ConstraintProcessor`), so a constrained request
and unconstrained ones decode in the same batch.

The mask is llguidance's bitmask (one bit per token), filled through its
numpy API and applied with plain MLX ops (``mx.where``): llguidance's own
MLX helper, like outlines' and mlx-vlm's, is a Metal kernel, which MLX's CPU
and CUDA builds do not have. The processor reads the token the matcher must
consume (the step's input, sampled by the step before) before the step's
forward pass is queued: reading it after would wait for that pass too (the
device runs its queue in order), which on an H200 cost more than the
forward pass itself at 8 rows (docs/benchmarks.md).

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
    """A grammar llguidance accepted, with the tokenizer it was checked against."""

    grammar: str
    tokenizer: Any  # llguidance.LLTokenizer
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
    """Compiled grammars of one loaded model, by grammar text (engine thread)."""

    def __init__(
        self, tokenizer: TokenizerWrapper, vocab: int, *, limit: int = MAX_GRAMMARS
    ) -> None:
        self._wrapper = tokenizer
        self._vocab = vocab
        self._limit = limit
        self._tokenizer: Any = None
        self._compiled: OrderedDict[str, Compiled] = OrderedDict()

    def compile(
        self, constraint: OutputConstraint, request_id: RequestId | None = None
    ) -> Compiled:
        """The compiled grammar; ``invalid_request`` naming ``constraint.field``
        if llguidance cannot compile it (whatever it raises: the text is the
        request's, so a failure is the request's, never ``internal``)."""
        from llguidance import LLMatcher

        rid = request_id
        try:
            grammar = grammar_text(constraint)
        except Exception as exc:
            raise InvalidRequest(
                f"{constraint.field}: {_short(str(exc))}", request_id=rid
            ) from None
        found = self._compiled.get(grammar)
        if found is not None:
            self._compiled.move_to_end(grammar)
            return found
        tokenizer = self._ll_tokenizer(rid)
        try:
            error = LLMatcher.validate_grammar(grammar, tokenizer)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        if error:
            raise InvalidRequest(f"{constraint.field}: {_short(error)}", request_id=rid)
        compiled = Compiled(grammar, tokenizer, self._vocab)
        self._compiled[grammar] = compiled
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
    a lane move took away, then masks the logits."""

    def __init__(self, compiled: Compiled, prompt_tokens: int) -> None:
        import llguidance.numpy as lln
        from llguidance import LLMatcher

        self._matcher = LLMatcher(compiled.tokenizer, compiled.grammar, log_level=0)
        self._prompt = prompt_tokens
        self._consumed = 0
        self._vocab = compiled.vocab
        self._bitmask = lln.allocate_token_bitmask(1, compiled.vocab)
        self._fill = lln.fill_next_token_bitmask
        self._broken = False
        self.offset = 0
        # On BatchGenerator's lane: this sequence's input token of the step,
        # read with every other row's in one go (bridge.engines.text.decoder).
        self.peek: Callable[[], int | None] | None = None

    def __call__(self, context: Any, logits: Any) -> Any:
        import mlx.core as mx
        import numpy as np

        answer = self.offset + int(context.shape[0]) - self._prompt
        if answer > self._consumed and self._matcher.is_stopped():
            self._consumed = answer  # the grammar is complete: what follows is the end
        elif answer > self._consumed:
            peeked = self.peek() if self.peek is not None and answer == self._consumed + 1 else None
            # Otherwise read before anything of this step is queued: the token was
            # sampled by the step before, so this waits for that step alone.
            new: list[int] = (
                [peeked] if peeked is not None else context[-(answer - self._consumed) :].tolist()
            )
            if not self._matcher.consume_tokens(new) and not self._broken:
                # cannot happen with the mask applied; end the answer rather than the batch
                log.error("grammar: %s; ending the answer", self._matcher.get_error())
                self._broken = True
            self._consumed = answer
        elif answer < self._consumed:  # a lane move fed a token again
            self._matcher.rollback(self._consumed - answer)
            self._consumed = answer
        self._fill(self._matcher, self._bitmask, 0)  # an error state leaves only EOS
        bits = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")
        allowed = mx.array(bits[: logits.shape[-1]].view(np.bool_))
        return mx.where(allowed, logits, -mx.inf)


def _short(text: str, limit: int = 500) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
