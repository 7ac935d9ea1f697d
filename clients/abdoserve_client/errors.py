"""A small, typed error hierarchy over tritonclient's single exception type.

Each error carries the gRPC status name it maps to (`.code`) and keeps the
original `InferenceServerException` as `__cause__`, so nothing is lost.
"""

from __future__ import annotations

from typing import Protocol


class AbdoServeError(Exception):
    """Base of every error the client raises; `code` is the gRPC status name."""

    code: str = "UNKNOWN"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class InvalidRequestError(AbdoServeError):
    """The server refused the study (INVALID_ARGUMENT); `message` names the fault."""

    code = "INVALID_ARGUMENT"


class ServerUnavailableError(AbdoServeError):
    """The server stayed UNAVAILABLE through every retry."""

    code = "UNAVAILABLE"


class DeadlineExceededError(AbdoServeError):
    """The call did not finish within the client's deadline."""

    code = "DEADLINE_EXCEEDED"


class TaskNotFoundError(AbdoServeError):
    """The server serves no model of that name (NOT_FOUND)."""

    code = "NOT_FOUND"


class ResponseError(AbdoServeError):
    """The server answered, but not in the shape the tensor contract promises."""

    code = "DATA_LOSS"


class _TritonException(Protocol):
    """What we use of `tritonclient.utils.InferenceServerException`."""

    def message(self) -> str | None: ...

    def status(self) -> str | None: ...


_BY_CODE: dict[str, type[AbdoServeError]] = {
    error.code: error
    for error in (
        InvalidRequestError,
        ServerUnavailableError,
        DeadlineExceededError,
        TaskNotFoundError,
    )
}


def status_name(error: _TritonException) -> str:
    """'StatusCode.INVALID_ARGUMENT' (as tritonclient reports it) -> 'INVALID_ARGUMENT'."""
    status = error.status() or "UNKNOWN"
    return status.rsplit(".", 1)[-1]


def from_triton(error: _TritonException) -> AbdoServeError:
    """The typed error for a tritonclient exception (the caller raises it `from` the original)."""
    code = status_name(error)
    message = error.message() or str(error)
    kind = _BY_CODE.get(code, AbdoServeError)
    return kind(message, code)
