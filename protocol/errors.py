"""Errors that cross the wire.

Every failure the worker reports has a stable ``code`` string and a human
message that names the field and the problem. On the Python side each code is
an exception class, so hosts written in Python can ``except`` on it::

    WireError                  base; .code, .message, .request_id
    ├── InvalidJson            invalid_json: not JSON, not UTF-8, not an object
    ├── LineTooLong            line_too_long: a line over the worker's limit
    ├── InvalidRequest         invalid_request: a field is missing or wrong
    ├── UnknownCommand         unknown_command
    ├── DuplicateId            duplicate_id: that id is already in flight
    ├── NoModel                no_model: the command needs a loaded model
    ├── ModelNotFound          model_not_found
    ├── LoadFailed             load_failed
    ├── OutOfMemory            out_of_memory
    ├── VisionNotSupported     vision_not_supported
    ├── ImageTooLarge          image_too_large: over the image byte, count or pixel caps
    ├── BadImage               bad_image: an image that cannot be read, fetched or decoded
    ├── Busy                   busy: the request queue is full
    ├── Cancelled              cancelled: a queued non-streaming request was cancelled
    ├── ShuttingDown           shutting_down: the worker is quitting
    ├── Forbidden              forbidden: the worker's flags do not allow it
    ├── ContextLengthExceeded  context_length_exceeded: prompt over the context or the cap
    ├── MlxMissing             mlx_missing: MLX or mlx-lm is not installed
    ├── RankFailed             rank_failed: a rank of a sharded worker died (.rank, .stderr_tail)
    └── Internal               internal: a bug; the message says what broke
"""

from __future__ import annotations

from typing import ClassVar

RequestId = str | int


class WireError(Exception):
    """A failure with a stable wire code. Raise a subclass, never this."""

    CODE: ClassVar[str] = "internal"

    def __init__(self, message: str, *, request_id: RequestId | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id

    @property
    def code(self) -> str:
        return self.CODE

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code}: {self.message!r})"


class InvalidJson(WireError):
    CODE = "invalid_json"


class LineTooLong(WireError):
    CODE = "line_too_long"


class InvalidRequest(WireError):
    CODE = "invalid_request"


class UnknownCommand(WireError):
    CODE = "unknown_command"


class DuplicateId(WireError):
    CODE = "duplicate_id"


class NoModel(WireError):
    CODE = "no_model"


class ModelNotFound(WireError):
    CODE = "model_not_found"


class LoadFailed(WireError):
    CODE = "load_failed"


class OutOfMemory(WireError):
    CODE = "out_of_memory"


class VisionNotSupported(WireError):
    CODE = "vision_not_supported"


class ImageTooLarge(WireError):
    CODE = "image_too_large"


class BadImage(WireError):
    CODE = "bad_image"


class Busy(WireError):
    CODE = "busy"


class Cancelled(WireError):
    CODE = "cancelled"


class ShuttingDown(WireError):
    CODE = "shutting_down"


class Forbidden(WireError):
    CODE = "forbidden"


class ContextLengthExceeded(WireError):
    CODE = "context_length_exceeded"


class MlxMissing(WireError):
    CODE = "mlx_missing"


class RankFailed(WireError):
    """A rank of a sharded worker died (or its collectives broke): the worker
    ends every request in flight with this and exits. ``rank`` is the rank
    that failed (None: not known, as when decoded from a bare code),
    ``exit_code`` its return code (negative: a signal; None: it had not
    exited), ``stderr_tail`` the last lines it wrote to stderr."""

    CODE = "rank_failed"

    def __init__(
        self,
        message: str,
        *,
        rank: int | None = None,
        exit_code: int | None = None,
        stderr_tail: str = "",
        request_id: RequestId | None = None,
    ) -> None:
        super().__init__(message, request_id=request_id)
        self.rank = rank
        self.exit_code = exit_code
        self.stderr_tail = stderr_tail


class Internal(WireError):
    CODE = "internal"


ERROR_CLASSES: dict[str, type[WireError]] = {
    cls.CODE: cls
    for cls in (
        InvalidJson,
        LineTooLong,
        InvalidRequest,
        UnknownCommand,
        DuplicateId,
        NoModel,
        ModelNotFound,
        LoadFailed,
        OutOfMemory,
        VisionNotSupported,
        ImageTooLarge,
        BadImage,
        Busy,
        Cancelled,
        ShuttingDown,
        Forbidden,
        ContextLengthExceeded,
        MlxMissing,
        RankFailed,
        Internal,
    )
}
ERROR_CODES: tuple[str, ...] = tuple(ERROR_CLASSES)


def error_from_code(code: str, message: str, *, request_id: RequestId | None = None) -> WireError:
    """The exception for a code read off the wire; unknown codes become Internal."""
    cls = ERROR_CLASSES.get(code, Internal)
    return cls(message, request_id=request_id)
