"""How the text engine reads a checked model directory into memory.

:class:`MlxLmEngine` loads through a :class:`WeightsLoader`. The default,
:class:`WholeModel`, is mlx-lm's ``load`` (lazy) followed by reading the
weights in groups, so that a ``load`` with ``progress`` hears how far it
is. A sharded worker (:mod:`bridge.shard`) passes a loader that holds only
its rank's part of the model; ``parts`` tells the engine's memory gates
how many ways the weights and the KV cache are split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from bridge.engines.engine_protocol import LoadStep, ReportLoad
from bridge.engines.mlx.memory import read_weights

if TYPE_CHECKING:
    import mlx.nn as nn
    from mlx_lm.tokenizer_utils import TokenizerWrapper


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadPlan:
    """What to load: a checked directory, its adapter, whether its own code may run."""

    directory: Path
    adapter: str | None
    trust_remote_code: bool
    weights_bytes: int
    context_len: int | None


Loaded = tuple["nn.Module", "TokenizerWrapper", dict[str, Any]]


class WeightsLoader(Protocol):
    @property
    def parts(self) -> int:
        """How many ways the model is split (1: this process holds all of it)."""
        ...

    def load(self, plan: LoadPlan, say: ReportLoad) -> Loaded:
        """The model, its tokenizer and its config; raises on failure."""
        ...


class WholeModel:
    """The whole model in this process: mlx-lm's ``load``, weights read with progress."""

    @property
    def parts(self) -> int:
        return 1

    def load(self, plan: LoadPlan, say: ReportLoad) -> Loaded:
        import mlx_lm

        trust = plan.trust_remote_code
        say(LoadStep(step="weights", done=0, total=plan.weights_bytes, unit="bytes"))
        model, tokenizer, config = mlx_lm.load(
            str(plan.directory),
            adapter_path=plan.adapter,
            tokenizer_config={"trust_remote_code": trust},
            return_config=True,
            trust_remote_code=trust,
            lazy=True,
        )
        say(LoadStep(step="tokenizer"))
        read_weights(model, plan.weights_bytes, say)
        return model, tokenizer, config
