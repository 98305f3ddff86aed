"""Domain errors of the engine. The gRPC adapter maps each to one status code (see servicers.py)."""

from __future__ import annotations


class EngineError(Exception):
    """Base class; `str(error)` is the message the caller sees."""


class InvalidArgument(EngineError):
    pass


class NotFound(EngineError):
    pass


class FailedPrecondition(EngineError):
    pass


class AlreadyExists(EngineError):
    pass


class Unimplemented(EngineError):
    pass


class Unavailable(EngineError):
    pass


class Internal(EngineError):
    """A bug: the engine could not apply an operation. Other operations of the batch are unaffected."""


REJECTION_ERRORS: dict[str, type[EngineError]] = {
    "failed_precondition": FailedPrecondition,
    "not_found": NotFound,
    "invalid_argument": InvalidArgument,
}
