"""This rank's part of a model, through mlx-lm's ``sharded_load``; the same on every rank.

``sharded_load`` ends with a collective (an ``all_sum`` barrier), so a
rank that fails before it would leave the others waiting there forever.
So a rank that fails anywhere in a load still takes part in exactly one
barrier (:meth:`ShardedModel.sync`) before it reports, and a rank whose
barrier itself fails has lost a peer (:class:`GroupBroken`). Rank 0 then
hears every rank's result (:mod:`bridge.shard.leader`) and fails the load
if any rank failed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bridge.engines.engine_protocol import LoadStep, ReportLoad
from bridge.engines.text.loading import Loaded, LoadPlan
from protocol.errors import LoadFailed

if TYPE_CHECKING:
    import mlx.core as mx

PIPELINE_INDEX = "model.safetensors.index.json"


class GroupBroken(RuntimeError):
    """A collective failed: a peer is gone, and the ranks can no longer agree."""


class ShardedModel:
    """A :class:`~bridge.engines.text.loading.WeightsLoader` for one rank.

    ``around`` (rank 0) is called with the plan before the rank loads, to
    start the other ranks' loads, and gives back what to call with this
    rank's error (or None) once the barrier has passed, to hear theirs."""

    def __init__(
        self,
        group: mx.distributed.Group,
        mode: str,
        *,
        around: Callable[[LoadPlan], Callable[[BaseException | None], None]] | None = None,
    ) -> None:
        self._group = group
        self._mode = mode
        self._around = around
        self.seed = 0  # set before each load: every rank seeds MLX's PRNG with it
        self.synced = True  # False from the start of a load until its barrier

    @property
    def parts(self) -> int:
        return int(self._group.size())

    def begin(self, seed: int) -> None:
        """A load starts: until :meth:`sync`, this rank owes the others a barrier."""
        self.seed = seed
        self.synced = False

    def sync(self) -> None:
        """The load's one barrier, if this rank has not passed it yet."""
        if self.synced:
            return
        import mlx.core as mx

        self.synced = True
        try:
            mx.eval(mx.distributed.all_sum(mx.array(1.0), stream=mx.cpu, group=self._group))
        except Exception as exc:
            raise GroupBroken(f"the ranks' barrier failed: {exc}") from exc

    def load(self, plan: LoadPlan, say: ReportLoad) -> Loaded:
        if plan.adapter is not None:
            raise LoadFailed(
                "adapter_path: a sharded worker loads no adapters (mlx-lm's sharded_load "
                "takes none); fuse the adapter into the model first (mlx_lm.fuse)"
            )
        if self._mode == "pipeline" and not (plan.directory / PIPELINE_INDEX).is_file():
            raise LoadFailed(
                f"path: --shard pipeline needs {PIPELINE_INDEX} in the model directory, "
                "to find each rank's layers; use --shard tensor"
            )
        finish = self._around(plan) if self._around is not None else None
        error: BaseException | None = None
        loaded: Loaded | None = None
        say(LoadStep(step="weights", done=0, total=plan.weights_bytes, unit="bytes"))
        try:
            loaded = self._sharded_load(plan)
            self.synced = True  # sharded_load's own barrier passed
        except Exception as exc:
            error = exc
        self.sync()
        if finish is not None:
            finish(error)
        if error is not None:
            raise error
        assert loaded is not None
        import mlx.core as mx

        mx.random.seed(self.seed)
        total = plan.weights_bytes
        say(LoadStep(step="weights", done=total, total=total, unit="bytes"))
        say(LoadStep(step="tokenizer"))
        return loaded

    def _sharded_load(self, plan: LoadPlan) -> Loaded:
        from mlx_lm.utils import sharded_load

        group = self._group
        trust = plan.trust_remote_code
        out: Any = sharded_load(
            str(plan.directory),
            pipeline_group=group if self._mode == "pipeline" else None,
            tensor_group=group if self._mode == "tensor" else None,
            return_config=True,
            tokenizer_config={"trust_remote_code": trust},
            trust_remote_code=trust,
        )
        model, tokenizer, config = out
        return model, tokenizer, config
