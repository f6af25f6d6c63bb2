"""Typed client errors: what went wrong, whether a retry can help, and the server's words."""

from __future__ import annotations

import grpc


class ServingClientError(Exception):
    """A call to a model server failed. ``code`` and ``details`` are the server's."""

    retryable = False

    def __init__(self, message: str, code: grpc.StatusCode | None = None, details: str = ""):
        super().__init__(message)
        self.code = code
        self.details = details


class ModelNotFoundError(ServingClientError):
    """The model, version or label is not being served (NOT_FOUND)."""


class InvalidInputError(ServingClientError):
    """The request does not match the model's signature (INVALID_ARGUMENT, or a local check)."""


class FailedPreconditionError(ServingClientError):
    """E.g. a label pointing at a version that is not AVAILABLE, an unknown signature."""


class UnavailableError(ServingClientError):
    """The server cannot be reached or is overloaded (UNAVAILABLE); retrying later can help."""

    retryable = True


class DeadlineExceededError(ServingClientError):
    """The call did not finish within its deadline."""

    retryable = True


class ResourceExhaustedError(ServingClientError):
    """The request is too large, or the server's queues are full."""


class AuthenticationError(ServingClientError):
    """UNAUTHENTICATED or PERMISSION_DENIED."""


class ServerError(ServingClientError):
    """Any other failure on the server side (INTERNAL, UNKNOWN, ...)."""


_BY_CODE = {
    grpc.StatusCode.NOT_FOUND: ModelNotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: AuthenticationError,
}


def from_rpc_error(error: grpc.RpcError, target: str) -> ServingClientError:
    """The typed error for a failed call (raise it ``from error`` to keep the chain)."""
    code = error.code() if hasattr(error, "code") else None
    details = (error.details() if hasattr(error, "details") else "") or ""
    cls = _BY_CODE.get(code, ServerError) if code is not None else ServerError
    name = code.name if code is not None else "UNKNOWN"
    return cls(f"{target}: {name}: {details}", code, details)
