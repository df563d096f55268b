"""The seam between the request loop and whatever runs the model.

``Engine`` is satisfied by the real mlx-lm engine (:mod:`bridge.engines.text.engine`)
and by the scripted engine of :mod:`mock_worker`. The scheduler calls every
method except :meth:`Engine.facts` and :meth:`Engine.memory` on its one
dedicated thread; those two are read from the stdin thread and must be cheap
and thread-safe.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from protocol.replies import AttentionFacts, MemoryStats, ModelFacts, TopLogprob
from protocol.requests import Detokenize, GenerationRequest, Inspect, Load, Sampling, Tokenize

if TYPE_CHECKING:
    from bridge.model_dir.files import ModelFiles


@dataclass(frozen=True, slots=True, kw_only=True)
class Prepared:
    """A generation request turned into prompt token ids, ready to run."""

    tokens: tuple[int, ...]
    sampling: Sampling


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
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    peak_memory_bytes: int = 0


ShouldAbort = Callable[[], bool]


class Engine(Protocol):
    def warm_up(self) -> None:
        """First call on the engine thread: import heavy libraries."""

    def load(self, request: Load) -> ModelFacts:
        """Load a model, replacing (and freeing) any current one."""

    def unload(self) -> bool:
        """Free the current model; False if none was loaded."""

    def prepare(self, request: GenerationRequest) -> Prepared:
        """Template and tokenize; raises a WireError for bad input."""

    def generate(
        self, prepared: Prepared, should_abort: ShouldAbort
    ) -> Generator[Step, None, None]:
        """Yield steps until finished. Checks ``should_abort`` between prefill
        chunks and returns early (without a final step) when it says so.
        Closing the iterator stops decoding."""

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

    def load_checked(self, request: Load, files: ModelFiles) -> ModelFacts:
        """``load`` of ``files`` (``request.path`` and ``adapter_path``, resolved)."""
