"""Exceptions of the SDK, and the one map from gRPC status codes to them.

Every RPC made by the SDK goes through `from_rpc_error`, so callers catch typed exceptions
(`NotFound`, `FailedPrecondition`, ...) and never a raw `grpc.RpcError`. Only the codes that
`is_transient` accepts are retried by the worker loop; everything else is a real answer.
"""

from __future__ import annotations

from typing import Final

import grpc

__all__ = [
    "AlreadyExists",
    "DeadlineExceeded",
    "EngineError",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "RetryableError",
    "TaskCancelled",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "from_rpc_error",
    "is_transient",
]


class EngineError(Exception):
    """The engine refused or could not answer a call.

    `code` is the gRPC status name (``"NOT_FOUND"``); `message` is the server's text, unchanged.
    """

    status_code: grpc.StatusCode | None = None

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or (self.status_code.name if self.status_code is not None else "UNKNOWN")

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" if self.message else self.code

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


class InvalidArgument(EngineError):
    """The request is malformed: a bad tree, bad JSON, or a payload over the size limit."""

    status_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(EngineError):
    """The pipeline, node or task does not exist."""

    status_code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(EngineError):
    """The operation is not legal in the target's current state, or a task token is stale."""

    status_code = grpc.StatusCode.FAILED_PRECONDITION


class AlreadyExists(EngineError):
    """A pipeline id chosen by the caller is taken."""

    status_code = grpc.StatusCode.ALREADY_EXISTS


class Unimplemented(EngineError):
    """The server does not support this operation (yet)."""

    status_code = grpc.StatusCode.UNIMPLEMENTED


class Unavailable(EngineError):
    """The server cannot be reached or is starting or stopping. Transient."""

    status_code = grpc.StatusCode.UNAVAILABLE


class PermissionDenied(EngineError):
    """The bearer token is valid but its role may not make this call."""

    status_code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(EngineError):
    """The bearer token is missing or wrong."""

    status_code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(EngineError):
    """The server is overloaded or a quota is used up. Transient."""

    status_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(EngineError):
    """The call did not finish before its deadline. Transient."""

    status_code = grpc.StatusCode.DEADLINE_EXCEEDED


_ERROR_BY_STATUS: Final[dict[grpc.StatusCode, type[EngineError]]] = {
    error.status_code: error
    for error in (
        InvalidArgument,
        NotFound,
        FailedPrecondition,
        AlreadyExists,
        Unimplemented,
        Unavailable,
        PermissionDenied,
        Unauthenticated,
        ResourceExhausted,
        DeadlineExceeded,
    )
    if error.status_code is not None
}

_TRANSIENT_STATUS: Final = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)


def error_for_status(status: grpc.StatusCode, message: str) -> EngineError:
    """The typed exception for a status code; codes without their own class give a plain `EngineError`."""
    error_class = _ERROR_BY_STATUS.get(status)
    if error_class is None:
        return EngineError(message, code=status.name)
    return error_class(message)


_STATUS_BY_NUMBER: Final[dict[int, grpc.StatusCode]] = {status.value[0]: status for status in grpc.StatusCode}


def error_for_code(code: int, message: str) -> EngineError:
    """The typed exception for a status code sent as a number (a stream reply's or a batch item's error)."""
    return error_for_status(_STATUS_BY_NUMBER.get(code, grpc.StatusCode.UNKNOWN), message)


def from_rpc_error(error: grpc.RpcError) -> EngineError:
    """Converts the error raised by a gRPC call, keeping the server's message verbatim."""
    # Errors raised by calls are also `grpc.Call`s; anything else (rare) has no status to read.
    code = getattr(error, "code", None)
    details = getattr(error, "details", None)
    status = code() if callable(code) else None
    message = details() if callable(details) else None
    if not isinstance(status, grpc.StatusCode):
        return EngineError(str(error), code="UNKNOWN")
    return error_for_status(status, message if isinstance(message, str) else "")


def is_transient(error: BaseException | grpc.StatusCode) -> bool:
    """True for the codes worth retrying with backoff: UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED."""
    if isinstance(error, grpc.StatusCode):
        return error in _TRANSIENT_STATUS
    return isinstance(error, (Unavailable, DeadlineExceeded, ResourceExhausted))


class RetryableError(Exception):
    """Raise from a component to fail the task as transient: the engine offers it again after
    `retry_after_ms` while the node's retry budget lasts."""

    def __init__(self, message: str, retry_after_ms: int = 0) -> None:
        if retry_after_ms < 0:
            raise ValueError(f"retry_after_ms must be >= 0, got {retry_after_ms}")
        super().__init__(message)
        self.message = message
        self.retry_after_ms = retry_after_ms


class TaskCancelled(Exception):
    """Raised by `TaskContext.raise_if_cancelled()` once the engine asked the task to stop
    (revoked, force-failed, timed out, lease lost, or the worker is shutting down)."""
