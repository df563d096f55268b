"""Drive mlx-bridge workers from Python, without touching pipes or JSON.

``Worker`` (threads) and ``AsyncWorker`` (asyncio) spawn ``python -P -m bridge``
(or any command speaking the protocol, such as ``module_command("mock_worker")``),
wait for its ``hello``, stream tokens, cancel, restart it after a crash if
asked to, and close it in escalating steps. ``WorkerPool`` and
``AsyncWorkerPool`` run several behind the same API (one per device, or
several on one), placing each request by affinity or load. See ``supervisor.errors`` for
what can go wrong.
"""

from protocol.replies import (
    AttentionFacts,
    HelloReply,
    InfoReply,
    Loaded,
    MemoryStats,
    ModelFacts,
    ProgressEvent,
    TopLogprob,
)

from .async_pool import AsyncWorkerPool
from .async_stream import AsyncStream
from .async_worker import AsyncWorker
from .errors import (
    InvalidArgument,
    MemoryLimitExceeded,
    ProtocolError,
    RequestError,
    SupervisorError,
    WorkerClosed,
    WorkerCrashed,
    WorkerTimeout,
)
from .placement import MemberStats, PoolStats
from .pool import WorkerPool
from .restart import RestartPolicy
from .results import StreamItem, StreamResult, Timings, Token, Usage, WorkerStats
from .settings import USE_DEFAULT, module_command
from .stream import Stream
from .worker import Worker

__all__ = [
    "AttentionFacts",
    "USE_DEFAULT",
    "AsyncStream",
    "AsyncWorker",
    "AsyncWorkerPool",
    "HelloReply",
    "InfoReply",
    "InvalidArgument",
    "Loaded",
    "MemoryLimitExceeded",
    "MemberStats",
    "MemoryStats",
    "ModelFacts",
    "PoolStats",
    "ProgressEvent",
    "ProtocolError",
    "RequestError",
    "RestartPolicy",
    "Stream",
    "StreamItem",
    "StreamResult",
    "SupervisorError",
    "Timings",
    "Token",
    "TopLogprob",
    "Usage",
    "Worker",
    "WorkerClosed",
    "WorkerCrashed",
    "WorkerPool",
    "WorkerStats",
    "WorkerTimeout",
    "module_command",
]
