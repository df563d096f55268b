"""``mlx-bridge --ranks N``: the command line of a sharded worker, and its start.

This process becomes rank 0: it starts ranks 1..N-1 (:class:`RankGroup`),
joins MLX's group with them, and serves the protocol as any worker does,
over a :class:`~bridge.shard.leader.ShardedEngine`.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from bridge.arguments import positive_int
from bridge.shard.plan import BACKENDS, MODES, PlanError, make_plan
from bridge.shard.ranks import RankGroup
from protocol.errors import LoadFailed, RankFailed, WireError

if TYPE_CHECKING:
    import mlx.core as mx

    from bridge.engines.engine_protocol import Engine, ModelEngine
    from bridge.loop.server import ServeOptions
    from bridge.shard.loader import ShardedModel

log = logging.getLogger("bridge.shard")


def add_shard_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sharding (one model over several processes; docs/hosts.md)")
    g.add_argument(
        "--ranks",
        type=positive_int,
        default=1,
        metavar="N",
        help="run the model sharded over N processes with mx.distributed: this one is rank 0 "
        "and starts and owns the others (default: 1, not sharded)",
    )
    g.add_argument(
        "--backend",
        choices=BACKENDS,
        default="ring",
        help="mx.distributed backend: ring (TCP, any machine) or nccl (CUDA, one GPU per "
        "rank) (default: ring)",
    )
    g.add_argument(
        "--shard",
        choices=MODES,
        default="tensor",
        help="tensor: every layer split over the ranks (model.shard); pipeline: each rank "
        "holds a run of layers (ring only; needs model.safetensors.index.json) "
        "(default: tensor)",
    )
    g.add_argument(
        "--hostfile",
        type=Path,
        metavar="FILE",
        help='mlx.launch\'s JSON hostfile, one host per rank ([{"ssh": name, "ips": [ip]}]); '
        "the first is this machine; ranks on other hosts are started over ssh "
        "(default: every rank on this machine, 127.0.0.1)",
    )


def run_sharded(
    p: argparse.ArgumentParser,
    args: argparse.Namespace,
    engine_options: dict[str, Any],
    serve_options: ServeOptions,
    routing: Callable[[ModelEngine, Callable[[str], None]], Engine],
) -> int:
    """Start the ranks, serve as rank 0, and end every rank with us."""
    from bridge.engines.text.engine import MlxLmEngine
    from bridge.loop.server import serve
    from bridge.shard.leader import ShardedEngine

    try:
        plan = make_plan(
            ranks=args.ranks,
            backend=args.backend,
            mode=args.shard,
            hostfile=args.hostfile,
            visible_gpus=os.environ.get("CUDA_VISIBLE_DEVICES"),
        )
    except PlanError as exc:
        p.error(str(exc))
    fatal: list[Callable[[WireError], NoReturn]] = []

    def abort(error: RankFailed) -> NoReturn:
        if fatal:
            fatal[0](error)
        log.error("%s; exiting", error.message)
        logging.shutdown()
        os._exit(1)

    with RankGroup(plan, engine_options) as group:
        os.environ.update(group.own_environment())  # before MLX is imported
        group.on_lost(abort)

        def make_engine(loader: ShardedModel) -> MlxLmEngine:
            return MlxLmEngine(loader=loader, **engine_options)

        def join() -> mx.distributed.Group:
            import mlx.core as mx

            return mx.distributed.init(backend=plan.backend, strict=True)

        sharded = ShardedEngine(group, make_engine, init_group=join, abort=abort)
        engine = routing(sharded, _no_vision)
        # inspect captures one process's attention: a sharded worker refuses it
        commands = tuple(c for c in serve_options.commands if c != "inspect")
        options = replace(serve_options, commands=commands)
        return serve(engine, options, on_fatal=fatal.append)


def _no_vision(path: str) -> None:
    raise LoadFailed(
        f"path: {path} is a vision model, which does not run sharded; "
        "load it in a worker without --ranks"
    )
