"""The seam between the request loop and whatever runs the model.

``Engine`` is satisfied by the real engines (:mod:`bridge.engines.routing`
over :mod:`bridge.engines.text.engine` and :mod:`bridge.engines.vision.engine`)
and by the scripted engine of :mod:`mock_worker`. The scheduler calls every
method except :meth:`Engine.facts` and :meth:`Engine.memory` on its one
dedicated thread; those two are read from the stdin thread and must be cheap
and thread-safe.

Generations run through the loaded model's :class:`Decoder`: the scheduler
(:mod:`bridge.loop.scheduler`) admits sequences into it, steps it (one
decode step for every decoding sequence, at most one prefill chunk), routes
each :data:`Event` to its request and removes what ended. The text engine's
is :class:`bridge.engines.text.decoder.TextDecoder`, the vision engine's
:class:`bridge.engines.vision.batch.VisionDecoder`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from protocol.errors import WireError
from protocol.replies import AttentionFacts, MemoryStats, ModelFacts, ToolCall, TopLogprob
from protocol.requests import (
    Detokenize,
    GenerationRequest,
    Inspect,
    Load,
    OutputConstraint,
    Sampling,
    Tokenize,
)

if TYPE_CHECKING:
    from bridge.model_dir.files import ModelFiles


@dataclass(frozen=True, slots=True, kw_only=True)
class ParsedAnswer:
    """Tool calls found in a finished answer, and the answer's text without them."""

    tool_calls: tuple[ToolCall, ...]
    content: str


AnswerParser = Callable[[str], ParsedAnswer | None]
"""Called once with the answer's text (stop strings removed); None: no tool calls."""


class Constraint(Protocol):
    """A compiled output grammar (:mod:`bridge.engines.constraints`)."""

    def processor(self, prompt_tokens: int) -> Any:
        """A fresh logits processor for one sequence whose prompt has ``prompt_tokens``."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Prepared:
    """A generation request turned into prompt token ids, ready to run.

    ``cache_key`` names the prompt-cache slot; ``answer_parser``, when set,
    looks for tool calls in the finished answer (for ``done``); ``output``
    is the output constraint (the request's, or the grammar ``tool_choice``
    asks for) and ``constraint`` its compiled grammar;
    ``draft_tokens`` how many tokens a loaded draft model proposes a step."""

    tokens: tuple[int, ...]
    sampling: Sampling
    cache_key: str | None = None
    answer_parser: AnswerParser | None = None
    output: OutputConstraint | None = None
    constraint: Constraint | None = None
    # Draft tokens a step may propose: None, no draft model is loaded; 0, this
    # request decodes without it.
    draft_tokens: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    """One decoded token as the engine produced it.

    ``finish_reason`` is set on the engine's last step (``stop`` for EOS,
    ``length`` for ``max_tokens``). An EOS step has ``is_eos`` set: its token
    is not part of the answer, though its ``text`` may flush held bytes.
    """

    text: str
    token_id: int
    is_eos: bool = False
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: tuple[TopLogprob, ...] | None = None
    from_draft: bool = False  # proposed by the draft model and accepted


ShouldAbort = Callable[[], bool]

SeqId = int

# Sequences decoded together unless --max-concurrency says otherwise. 64: on
# the H200 the 0.6B shape decoded 3,795 tok/s at 64 streams against 3,036 at
# 32 (docs/benchmarks.md); the KV-memory admission bounds it too.
DEFAULT_MAX_CONCURRENCY = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class Prefilled:
    """Prefill progress of one sequence: ``done`` of ``total`` prompt tokens
    (the tokens it feeds: those found in the prompt cache are not counted)."""

    seq: SeqId
    done: int
    total: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Decoded:
    """One token of one sequence. A step with ``finish_reason`` is its last:
    the decoder has already let the sequence go."""

    seq: SeqId
    step: Step


@dataclass(frozen=True, slots=True, kw_only=True)
class Failed:
    """One sequence failed on its own and the others go on (the vision
    decoder's solo lanes); the decoder has already let it go."""

    seq: SeqId
    error: WireError


Event = Prefilled | Decoded | Failed


@dataclass(frozen=True, slots=True, kw_only=True)
class KvShape:
    """What the scheduler needs to admit sequences against memory.

    ``bytes_per_token`` is one token's KV cache over all layers (0: unknown,
    no memory admission); ``budget`` the bytes all KV caches together may
    take (None: unbounded). ``padded``: a batch's rows share one length, so
    a batch takes ``rows × longest row`` tokens (mlx-lm's ``BatchKVCache`` is
    left-padded to its longest row).
    """

    bytes_per_token: int = 0
    budget: int | None = None
    padded: bool = True


class Decoder(Protocol):
    """The sequences of one loaded model, decoded together (engine thread only)."""

    @property
    def capacity(self) -> int:
        """Most sequences it takes at once."""
        ...

    @property
    def kv(self) -> KvShape: ...

    def add(self, seq: SeqId, prepared: Prepared, *, should_abort: ShouldAbort) -> int:
        """Start ``seq``; returns how many of its prompt tokens the prompt
        cache held. ``should_abort`` is the request's cancel flag, for a
        decoder that cannot stop between two steps (a prefill in one call)."""
        ...

    def remove(self, seq: SeqId) -> None:
        """Stop ``seq`` in whatever phase it is (waiting, prefilling,
        decoding) and keep its prompt cache; no event for it follows."""
        ...

    def step(self) -> Sequence[Event]:
        """One decode step of every decoding sequence and at most one prefill
        chunk; what happened, in order."""
        ...

    def peak_memory(self) -> int:
        """Peak bytes the engine has used, for ``done``."""
        ...

    def close(self) -> None:
        """Let every sequence go (the model is about to change, or the worker ends)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadStep:
    """How far a load has come: ``step`` is one of
    :data:`protocol.replies.LOAD_STEPS`; ``done`` of ``total`` counts ``unit``."""

    step: str
    done: int | None = None
    total: int | None = None
    unit: str | None = None


ReportLoad = Callable[[LoadStep], None]


def no_report(step: LoadStep) -> None:
    """The ``ReportLoad`` of a load that did not ask for progress."""


class Engine(Protocol):
    def warm_up(self) -> None:
        """First call on the engine thread: import heavy libraries."""

    def load(self, request: Load, report: ReportLoad | None = None) -> ModelFacts:
        """Load a model, replacing (and freeing) any current one; ``report``
        hears each step."""

    def unload(self) -> bool:
        """Free the current model; False if none was loaded."""

    def prepare(self, request: GenerationRequest) -> Prepared:
        """Template and tokenize; raises a WireError for bad input."""

    def decoder(self) -> Decoder:
        """The loaded model's decoder (called after ``prepare`` succeeded, so
        a model is loaded). The scheduler keeps it until a load or unload."""

    def tokenize(self, request: Tokenize) -> tuple[int, ...]: ...

    def detokenize(self, request: Detokenize) -> str: ...

    def inspect(self, request: Inspect) -> AttentionFacts:
        """Write the prompt's attention queries and keys to files (see
        :mod:`bridge.engines.text.inspect_attention`); raises a WireError when it cannot."""

    def facts(self) -> ModelFacts | None:
        """The loaded model, or None. Any thread."""

    def memory(self) -> MemoryStats:
        """Current memory figures. Any thread."""

    def close(self) -> None:
        """Last call on the engine thread (release per-thread state)."""


class ModelEngine(Engine, Protocol):
    """An engine that loads from a model directory already checked by
    :func:`bridge.model_dir.files.open_model` (the routing engine checks once,
    with ``--model-root``, and hands the result over)."""

    def load_checked(
        self, request: Load, files: ModelFiles, report: ReportLoad | None = None
    ) -> ModelFacts:
        """``load`` of ``files`` (``request.path`` and ``adapter_path``, resolved)."""
