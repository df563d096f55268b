"""One output-grammar mask for the whole decode batch, applied to the model's logits.

mlx-lm's ``BatchGenerator`` runs logits processors row by row: once any row
has one, every decode step slices the logits into rows, calls each row's
processors and joins the rows again, and a constrained row's mask is filled,
uploaded and applied on its own. At 8 rows on an H200 that made a
constrained step about 20% slower than a plain one (docs/benchmarks.md).

So a constrained row's :class:`~bridge.engines.constraints.ConstraintProcessor`
masks only its first token in the batch (the step that admits it, where its
context is the whole prompt) and then hands its matcher over: its processor
leaves the row's list (so a batch with no other processors is no longer
split), and :class:`MaskedModel`, the model the ``BatchGenerator`` calls,
masks it on every later step. For one decode step it queues the step's input
tokens, then the forward pass, and while the device computes reads the
tokens, advances every handed-over matcher by its row's token, fills every
row's bitmask with llguidance's parallel executor and masks the batch's
logits in one op.

It finds the decode batch through ``BatchGenerator``'s ``_generation_batch``
(its ``uids``, ``prompt_cache`` and ``logits_processors``), which is not
public: a model call for anything else (a prefill chunk, the first step of
rows just admitted) passes through, and without those fields no row is
handed over and each keeps its own processor (correct, only slower).
``tests/bridge/test_decoder.py`` fails if they change.

Engine thread only. MLX and llguidance are imported lazily.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bridge.engines.constraints import ConstraintProcessor, masked

if TYPE_CHECKING:
    import mlx.nn as nn
    from mlx_lm.generate import BatchGenerator


class BatchMasks:
    """The handed-over rows of one decoder's batch, by sequence uid."""

    def __init__(self, generator: Callable[[], BatchGenerator | None]) -> None:
        self._generator = generator
        self._pending: dict[int, ConstraintProcessor] = {}  # asked to hand over
        self._rows: dict[int, ConstraintProcessor] = {}
        self._executor: Any = None

    def enlist(self, uid: int, constraint: ConstraintProcessor) -> None:
        """Row ``uid`` joins the batch, its processors ending with ``constraint``."""
        constraint.hand_over = lambda c: self._pending.__setitem__(uid, c)

    def drop(self, uid: int, constraint: ConstraintProcessor | None) -> None:
        """Row ``uid`` left the batch: its processor masks it again wherever it goes."""
        self._pending.pop(uid, None)
        self._rows.pop(uid, None)
        if constraint is not None:
            constraint.hand_over = None

    @property
    def handed_over(self) -> frozenset[int]:
        return frozenset(self._rows)

    def rows(self, x: Any, cache: Any) -> list[tuple[int, ConstraintProcessor]]:
        """The handed-over rows of the model call ``(x, cache)``, by index:
        none unless it is the decode batch's step."""
        batch = getattr(self._generator(), "_generation_batch", None)
        if batch is None or cache is None or cache is not getattr(batch, "prompt_cache", None):
            return []
        uids = getattr(batch, "uids", None)
        lists = getattr(batch, "logits_processors", None)
        if uids is None or lists is None or tuple(x.shape) != (len(uids), 1):
            return []
        if self._pending:
            self._take_over(uids, lists)
        rows = self._rows
        return [(i, rows[uid]) for i, uid in enumerate(uids) if uid in rows]

    def _take_over(self, uids: list[int], lists: list[Any]) -> None:
        """Rows whose processor asked to hand over: the processor leaves the
        row's processors in the batch (mlx-lm keeps each row's as a tuple, in
        order), the mask takes the row."""
        for i, uid in enumerate(uids):
            constraint = self._pending.pop(uid, None)
            if constraint is None or i >= len(lists):
                continue
            processors = tuple(lists[i] or ())
            if processors and processors[-1] is constraint:
                lists[i] = processors[:-1]
                self._rows[uid] = constraint

    def apply(self, x: Any, logits: Any, rows: list[tuple[int, ConstraintProcessor]]) -> Any:
        """Advance every row's matcher by its input token in ``x`` and mask
        ``logits`` (batch, 1, vocab). ``x`` was queued before the forward pass."""
        import mlx.core as mx

        # the device computes the step while the masks are filled
        mx.async_eval(logits)  # type: ignore[no-untyped-call]
        return masked(logits, self.advance(x.tolist(), rows, logits.shape[-1]))

    def advance(
        self, tokens: list[list[int]], rows: list[tuple[int, ConstraintProcessor]], vocab: int
    ) -> Any:
        """Every row's matcher advanced by its row of ``tokens``; the batch's
        bitmask (every token allowed in rows not handed over)."""
        import llguidance.numpy as lln
        import numpy as np
        from llguidance import LLExecutor

        for i, constraint in rows:
            constraint.consume(tokens[i])
        if self._executor is None:
            self._executor = LLExecutor()
        # as wide as every matcher writes (a grammar's vocabulary is the model's, so
        # this is the logits' width; never narrower than what llguidance fills)
        width = max([vocab, *(c.vocab for _, c in rows)])
        bitmask = np.full(lln.get_bitmask_shape(len(tokens), width), -1, np.int32)
        lln.fill_next_token_bitmask_par(self._executor, [(c.matcher, i) for i, c in rows], bitmask)
        return bitmask


class MaskedModel:
    """The model as the decode batch calls it: the handed-over rows masked
    (:class:`BatchMasks`); everything else is the model's own."""

    def __init__(self, model: nn.Module, masks: BatchMasks) -> None:
        self._model = model
        self._masks = masks

    def __call__(self, x: Any, cache: Any = None, **kwargs: Any) -> Any:
        rows = self._masks.rows(x, cache)
        if not rows:
            return self._model(x, cache=cache, **kwargs)
        import mlx.core as mx

        # ahead of the forward pass, so that reading it waits for nothing else
        mx.async_eval(x)  # type: ignore[no-untyped-call]
        return self._masks.apply(x, self._model(x, cache=cache, **kwargs), rows)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)
