"""Drive mlx-bridge workers from Python, without touching pipes or JSON.

``Worker`` (threads) and ``AsyncWorker`` (asyncio) spawn ``python -P -m bridge``
(or any command speaking the protocol, such as ``module_command("mock_worker")``),
wait for its ``hello``, stream tokens, cancel, restart it after a crash if
asked to, and close it in escalating steps. See ``supervisor.errors`` for
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
    "HelloReply",
    "InfoReply",
    "InvalidArgument",
    "Loaded",
    "MemoryLimitExceeded",
    "MemoryStats",
    "ModelFacts",
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
    "WorkerStats",
    "WorkerTimeout",
    "module_command",
]
