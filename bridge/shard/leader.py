"""Rank 0's engine: the text engine on its part of the model, mirrored to every rank.

:class:`ShardedEngine` is a :class:`~bridge.engines.engine_protocol.ModelEngine`
(the routing engine's text engine, with vision refused). Every call that
runs the model is also sent to the other ranks, in the order rank 0 makes
it:

- ``load``: once rank 0's own checks have passed, ``LoadModel`` (with the
  PRNG seed every rank takes); rank 0 then loads its part and hears every
  rank's result (:mod:`bridge.shard.loader` says why no rank is left in the
  load's barrier);
- ``unload``;
- the decoder (:class:`MirroredDecoder`): each sequence added and removed
  since the last step, then the step, in one frame per step.

Tokenizing, templating, stop strings, cancel and every reply stay on rank 0.
A failure in a call that runs the model (a collective that broke, an
engine error) cannot be undone on the other ranks, so it is fatal:
:meth:`RankGroup.failed` names the rank, and ``abort`` ends the worker.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, NoReturn

from bridge.engines.engine_protocol import (
    Decoder,
    Event,
    KvShape,
    Prepared,
    ReportLoad,
    SeqId,
    ShouldAbort,
)
from bridge.engines.mlx.memory import memory_stats
from bridge.engines.text.engine import MlxLmEngine
from bridge.engines.text.loading import LoadPlan
from bridge.model_dir.files import ModelFiles
from bridge.shard import control
from bridge.shard.loader import ShardedModel
from bridge.shard.place import device_name, hostname
from bridge.shard.ranks import RankGroup
from protocol.errors import InvalidRequest, LoadFailed, NoModel, RankFailed
from protocol.replies import (
    AttentionFacts,
    MemoryStats,
    ModelFacts,
    RankMemory,
    Sharding,
    ShardRank,
)
from protocol.requests import Detokenize, GenerationRequest, Inspect, Load, Tokenize

if TYPE_CHECKING:
    import mlx.core as mx

log = logging.getLogger("bridge.shard")

ASK_MEMORY_TIMEOUT_S = 1.0
Abort = Callable[[RankFailed], NoReturn]


class ShardedEngine:
    def __init__(
        self,
        group: RankGroup,
        make_engine: Callable[[ShardedModel], MlxLmEngine],
        *,
        init_group: Callable[[], mx.distributed.Group],
        abort: Abort,
    ) -> None:
        """``make_engine`` builds the text engine over the loader;
        ``init_group`` joins MLX's distributed group (on the engine thread);
        ``abort`` ends the worker after a failure the ranks cannot recover from."""
        self._group = group
        self._make_engine = make_engine
        self._init_group = init_group
        self._abort = abort
        self._engine: MlxLmEngine | None = None
        self._ready: list[control.Ready] = []
        self._device = "cpu"
        self._weights: dict[int, int] = {}  # rank → bytes its part holds, from the last load

    # -- engine thread ---------------------------------------------------------------

    def warm_up(self) -> None:
        try:
            group = self._init_group()
        except Exception as exc:
            self._abort(self._group.failed(exc))
        if group.size() != self._group.plan.ranks:
            self._abort(
                RankFailed(
                    f"MLX's {self._group.plan.backend} group has {group.size()} ranks, "
                    f"not {self._group.plan.ranks}",
                    rank=0,
                )
            )
        loader = ShardedModel(group, self._group.plan.mode, around=self._around_load)
        self._engine = self._make_engine(loader)
        self._engine.warm_up()
        self._device = device_name()
        self._ready = self._group.answers(control.Ready)
        log.info(
            "rank 0 of %d ready (%s, %s)",
            group.size(),
            self._group.plan.backend,
            self._group.plan.mode,
        )

    def load(self, request: Load, report: ReportLoad | None = None) -> ModelFacts:
        return self._with_sharding(self._text.load(request, report))

    def load_checked(
        self, request: Load, files: ModelFiles, report: ReportLoad | None = None
    ) -> ModelFacts:
        return self._with_sharding(self._text.load_checked(request, files, report))

    def unload(self) -> bool:
        was = self._text.unload()
        self._group.send([control.UnloadModel()])
        return was

    def prepare(self, request: GenerationRequest) -> Prepared:
        return self._text.prepare(request)

    def decoder(self) -> Decoder:
        return MirroredDecoder(self._text.decoder(), self._group, self._abort)

    def tokenize(self, request: Tokenize) -> tuple[int, ...]:
        return self._text.tokenize(request)

    def detokenize(self, request: Detokenize) -> str:
        return self._text.detokenize(request)

    def inspect(self, request: Inspect) -> AttentionFacts:
        if self._text.facts() is None:
            raise NoModel("no model loaded; send load first", request_id=request.id)
        raise InvalidRequest(
            "inspect: a sharded worker cannot capture attention (each rank holds part of "
            "the heads); run inspect on a worker without --ranks",
            request_id=request.id,
        )

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()

    # -- any thread ---------------------------------------------------------------------

    def facts(self) -> ModelFacts | None:
        facts = self._engine.facts() if self._engine is not None else None
        if facts is None:
            return None
        return replace(facts, sharding=self._sharding())

    def memory(self) -> MemoryStats:
        mine = self._engine.memory() if self._engine is not None else memory_stats()
        ranks = [
            RankMemory(
                rank=0,
                active_bytes=mine.active_bytes,
                peak_bytes=mine.peak_bytes,
                cache_bytes=mine.cache_bytes,
                rss_bytes=mine.rss_bytes,
            )
        ]
        self._group.send([control.AskMemory()])
        try:
            answers = self._group.answers(control.Memory, ASK_MEMORY_TIMEOUT_S)
        except (TimeoutError, RankFailed) as exc:
            log.warning("the ranks' memory is not known: %s", exc)
            answers = []
        ranks.extend(
            RankMemory(
                rank=m.rank,
                active_bytes=m.active_bytes,
                peak_bytes=m.peak_bytes,
                cache_bytes=m.cache_bytes,
                rss_bytes=m.rss_bytes,
            )
            for m in answers
        )
        return replace(mine, ranks=tuple(ranks))

    # -- helpers ------------------------------------------------------------------------

    @property
    def _text(self) -> MlxLmEngine:
        if self._engine is None:
            raise RuntimeError("the sharded engine is used before warm_up")
        return self._engine

    def _around_load(self, plan: LoadPlan) -> Callable[[BaseException | None], None]:
        seed = secrets.randbits(32)
        assert self._engine is not None
        self._loader.begin(seed)  # this rank too owes the others the load's barrier
        self._group.send(
            [
                control.LoadModel(
                    path=str(plan.directory),
                    context_len=plan.context_len,
                    trust_remote_code=plan.trust_remote_code,
                    seed=seed,
                )
            ]
        )

        def finish(error: BaseException | None) -> None:
            results = self._group.answers(control.LoadResult)
            failed = [r for r in results if r.error is not None]
            self._weights = {r.rank: r.weights_bytes for r in results}
            if error is None and not failed:
                return
            self._group.send([control.UnloadModel()])  # a rank failed: nobody keeps the model
            if failed:
                first = failed[0]
                raise LoadFailed(f"rank {first.rank}: {first.error}")

        return finish

    @property
    def _loader(self) -> ShardedModel:
        assert self._engine is not None
        loader = self._engine.loader
        assert isinstance(loader, ShardedModel)
        return loader

    def _with_sharding(self, facts: ModelFacts) -> ModelFacts:
        """A load's facts: rank 0's part is what MLX holds now."""
        self._weights[0] = memory_stats().active_bytes
        return replace(facts, sharding=self._sharding())

    def _sharding(self) -> Sharding:
        plan = self._group.plan
        ranks = [
            ShardRank(
                rank=0,
                pid=os.getpid(),
                host=hostname(),
                device=self._device,
                weights_bytes=self._weights.get(0, 0),
            )
        ]
        ranks.extend(
            ShardRank(
                rank=r.rank,
                pid=r.pid,
                host=r.host,
                device=r.device,
                weights_bytes=self._weights.get(r.rank, 0),
            )
            for r in self._ready
        )
        return Sharding(backend=plan.backend, mode=plan.mode, ranks=tuple(ranks))


class MirroredDecoder:
    """Rank 0's decoder; every change and step also reaches the other ranks.

    Adds and removes are held until the next step and sent with it in one
    frame (they run no model code, so the other ranks may apply them late,
    as long as it is before the step)."""

    def __init__(self, decoder: Decoder, group: RankGroup, abort: Abort) -> None:
        self._decoder = decoder
        self._group = group
        self._abort = abort
        self._pending: list[control.Order] = []
        self._last: control.StepTokens = ()

    @property
    def capacity(self) -> int:
        return self._decoder.capacity

    @property
    def kv(self) -> KvShape:
        return self._decoder.kv

    def add(self, seq: SeqId, prepared: Prepared, *, should_abort: ShouldAbort) -> int:
        cached = self._decoder.add(seq, prepared, should_abort=should_abort)
        self._pending.append(
            control.Add(
                seq=seq,
                tokens=prepared.tokens,
                sampling=prepared.sampling,
                cache_key=prepared.cache_key,
                cached=cached,
                output=prepared.output,
            )
        )
        return cached

    def remove(self, seq: SeqId) -> None:
        self._decoder.remove(seq)
        self._pending.append(control.Remove(seq=seq))

    def step(self) -> Sequence[Event]:
        self._pending.append(control.StepBatch(last=self._last))
        orders, self._pending = self._pending, []
        self._group.send(orders)
        try:
            events = self._decoder.step()
        except Exception as exc:  # the ranks may have parted ways: nothing can be trusted
            log.exception("sharded decode step failed")
            self._abort(self._group.failed(exc))
        self._last = control.decoded_tokens(events)
        return events

    def peak_memory(self) -> int:
        return self._decoder.peak_memory()

    def close(self) -> None:
        self._decoder.close()
        orders, self._pending = self._pending, []
        self._group.send([*orders, control.CloseDecoder(last=self._last)])
        self._last = ()
