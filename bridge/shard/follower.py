"""``python -P -m bridge.shard.follower``: rank r ≥ 1 of a sharded worker.

Started by rank 0 (:mod:`bridge.shard.ranks`), never by a host. It reads
rank 0's orders (:mod:`bridge.shard.control`) on stdin and makes the same
engine calls rank 0 makes, in the same order, on its own part of the model,
so that every collective meets its peers; it writes no protocol, only
answers to rank 0 on its stdout (fd 1 is pointed at stderr, where mlx-lm's
prints land) and logs on stderr.

It dies with rank 0: at end of stdin it exits at once, whatever the engine
thread is doing (a collective waiting on a peer never returns); Linux also
kills it when rank 0 dies (``PR_SET_PDEATHSIG``). It fails stop: any error
in an order exits it (status 1), and rank 0 reports that rank's death.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import signal
import sys
import threading
from typing import Any, NoReturn

from bridge.engines.engine_protocol import Decoder, Prepared
from bridge.engines.mlx.memory import clear_streams, memory_stats
from bridge.engines.text.engine import MlxLmEngine
from bridge.loop.stdio import claim_stdout
from bridge.model_dir.files import open_model
from bridge.shard import control
from bridge.shard.loader import ShardedModel
from bridge.shard.place import device_name, hostname
from protocol.requests import Load

log = logging.getLogger("bridge.shard")

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Linux: SIGKILL this process when the thread that started it ends (rank
    0's main thread, which lives as long as rank 0). Elsewhere: stdin's end
    of file is enough."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # rank 0 is already gone
        os._exit(0)


class Follower:
    def __init__(self, answers_fd: int, start: control.Start) -> None:
        self._fd = answers_fd
        self._lock = threading.Lock()
        self._start = start
        self.rank = start.rank
        self._engine: MlxLmEngine | None = None
        self._loader: ShardedModel | None = None
        self._decoder: Decoder | None = None
        self._last: control.StepTokens = ()  # this rank's tokens of its last step

    def answer(self, message: control.Answer) -> None:
        with self._lock:
            control.write_frame(self._fd, [message])

    def answer_memory(self) -> None:
        m = memory_stats()
        self.answer(
            control.Memory(
                rank=self.rank,
                active_bytes=m.active_bytes,
                peak_bytes=m.peak_bytes,
                cache_bytes=m.cache_bytes,
                rss_bytes=m.rss_bytes,
            )
        )

    # -- the engine thread (this process's main thread) ------------------------------

    def join(self) -> None:
        import mlx.core as mx

        group = mx.distributed.init(backend=self._start.backend, strict=True)
        self._loader = ShardedModel(group, self._start.mode)
        options = dict(self._start.engine_options)
        self._engine = MlxLmEngine(loader=self._loader, **options)
        self._engine.warm_up()
        ready = control.Ready(
            rank=self.rank, pid=os.getpid(), host=hostname(), device=device_name()
        )
        self.answer(ready)
        start = self._start
        log.info("rank %d of %d ready (%s, %s)", self.rank, group.size(), start.backend, start.mode)

    def run(self, order: Any) -> bool:
        """Carry out one order; False on ``Stop``."""
        engine = self._engine
        assert engine is not None and self._loader is not None
        match order:
            case control.StepBatch():
                assert self._decoder is not None, "step before any sequence"
                self._agree(order.last)
                self._last = control.decoded_tokens(self._decoder.step())
            case control.Add():
                decoder = self._decoder or engine.decoder()
                self._decoder = decoder
                output = order.output
                prepared = Prepared(
                    tokens=order.tokens,
                    sampling=order.sampling,
                    cache_key=order.cache_key,
                    output=output,
                    constraint=engine.compile_constraint(output) if output else None,
                )
                cached = decoder.add(order.seq, prepared, should_abort=_never)
                if cached != order.cached:
                    raise RuntimeError(
                        f"sequence {order.seq}: rank 0 found {order.cached} prompt tokens in its "
                        f"prompt cache, rank {self.rank} {cached}: the ranks have parted ways"
                    )
            case control.Remove():
                if self._decoder is not None:
                    self._decoder.remove(order.seq)
            case control.CloseDecoder():
                self._agree(order.last)
                self._close_decoder()
            case control.LoadModel():
                self._close_decoder()
                self._load(order)
            case control.UnloadModel():
                self._close_decoder()
                engine.unload()
            case control.AskMemory():  # one that came before the order thread could answer it
                self.answer_memory()
            case control.Stop():
                return False
            case _:
                raise RuntimeError(f"unknown order {type(order).__name__}")
        return True

    def close(self) -> None:
        self._close_decoder()
        if self._engine is not None:
            self._engine.close()
        clear_streams()

    def _agree(self, rank0: control.StepTokens) -> None:
        """Every rank samples for itself (same logits, same PRNG state): had
        this one drawn another token, the ranks would go on with different
        caches, so that is fatal, not silent."""
        mine, self._last = self._last, ()
        if mine != rank0:
            raise RuntimeError(
                f"rank {self.rank} decoded {list(mine)} where rank 0 decoded {list(rank0)} "
                "(sequence, token): the ranks have parted ways"
            )

    def _close_decoder(self) -> None:
        self._last = ()
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None

    def _load(self, order: control.LoadModel) -> None:
        engine, loader = self._engine, self._loader
        assert engine is not None and loader is not None
        loader.begin(order.seed)
        error: str | None = None
        try:
            request = Load(
                path=order.path,
                context_len=order.context_len,
                trust_remote_code=order.trust_remote_code,
                force=True,  # rank 0's gate decided; this rank's part is its share
            )
            engine.load_checked(request, open_model(order.path))
        except Exception as exc:
            error = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            log.warning("rank %d: load failed: %s", self.rank, error)
        loader.sync()  # a failed load still meets the others at the barrier
        weights = memory_stats().active_bytes if error is None else 0
        self.answer(control.LoadResult(rank=self.rank, error=error, weights_bytes=weights))


def _never() -> bool:
    return False


def _read_orders(follower_box: list[Follower], orders: queue.Queue[Any]) -> None:
    """stdin → ``orders``; memory questions are answered here, between steps or not.
    At end of stdin (rank 0 is gone, or done) the process exits at once."""
    stdin = sys.stdin.buffer
    try:
        while True:
            frame = control.read_frame(stdin)
            if frame is None:
                break
            for order in frame:
                if isinstance(order, control.AskMemory) and follower_box:
                    follower_box[0].answer_memory()
                else:
                    orders.put(order)
    except Exception:
        log.exception("unreadable order from rank 0")
    logging.shutdown()
    os._exit(0)


def main() -> NoReturn:
    die_with_parent()
    logging.basicConfig(
        stream=sys.stderr,
        level=os.environ.get("MLX_BRIDGE_RANK_LOG_LEVEL", "WARNING"),
        format="%(name)s %(levelname)s: %(message)s",
    )
    answers_fd = claim_stdout()
    orders: queue.Queue[Any] = queue.Queue()
    box: list[Follower] = []
    threading.Thread(target=_read_orders, args=(box, orders), name="orders", daemon=True).start()
    start = orders.get()
    if not isinstance(start, control.Start):
        log.error("the first order is %s, not Start", type(start).__name__)
        os._exit(1)
    follower = Follower(answers_fd, start)
    code = 0
    try:
        follower.join()
        box.append(follower)
        while follower.run(orders.get()):
            pass
        follower.close()
    except Exception:
        log.exception("rank %d failed; exiting", start.rank)
        code = 1
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    main()
