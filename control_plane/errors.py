"""Errors of the control plane's API, and the one table (:data:`ERROR_TABLE`) that maps
every error to its HTTP status, gRPC status code and reason, for REST and gRPC alike::

    SpecmeshError
    +-- ApiError
    |   +-- UnauthenticatedError    no or unknown bearer token        401 / UNAUTHENTICATED
    |   +-- PermissionDeniedError   the role may not do this          403 / PERMISSION_DENIED
    |   +-- BadRequestError         a malformed request body/param    400 / INVALID_ARGUMENT
    |   +-- BodyTooLargeError       a request body over the limit     413 / RESOURCE_EXHAUSTED
    |   +-- TrackEmptyError         a release sends calls to a track  409 / FAILED_PRECONDITION
    |                               with no ready instance (or none
    |                               observed yet)
    +-- (core errors, see specmesh.errors)
        SpecError                                                     400 / INVALID_ARGUMENT
        ConflictError                                                 409 / ABORTED
        NameCollisionError                                            409 / ALREADY_EXISTS
        NotFoundError                                                 404 / NOT_FOUND
        StoreUnavailableError, SecretUnavailableError                 503 / UNAVAILABLE
        SecretAccessDeniedError                                       403 / PERMISSION_DENIED
        SecretReferenceError                                          400 / INVALID_ARGUMENT
        MeshObjectError (rendered Istio objects invalid)             400 / FAILED_PRECONDITION
        anything else                                                 500 / INTERNAL
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from control_plane.mesh import MeshObjectError
from specmesh.errors import (
    ConflictError,
    NameCollisionError,
    NotFoundError,
    SecretAccessDeniedError,
    SecretReferenceError,
    SecretUnavailableError,
    SpecError,
    SpecmeshError,
    StoreUnavailableError,
)

__all__ = [
    "ERROR_TABLE",
    "INTERNAL",
    "ApiError",
    "BadRequestError",
    "BodyTooLargeError",
    "ErrorMapping",
    "PermissionDeniedError",
    "TrackEmptyError",
    "UnauthenticatedError",
    "error_body",
    "error_mapping",
    "error_message",
    "status_for",
]


class ApiError(SpecmeshError):
    """An error of the API layer itself."""


class UnauthenticatedError(ApiError):
    def __init__(self, reason: str = "missing or unknown bearer token") -> None:
        self.reason = reason
        super().__init__(reason)


class PermissionDeniedError(ApiError):
    def __init__(self, *, principal: str, action: str) -> None:
        self.principal = principal
        self.action = action
        super().__init__(f"{principal!r} may not {action}")


class BadRequestError(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(message)


class BodyTooLargeError(ApiError):
    def __init__(self, *, limit: int) -> None:
        self.limit = limit
        super().__init__(f"body: must be at most {limit} bytes")


class TrackEmptyError(ApiError):
    """A release would send calls to a track of ``agent`` with no ready instance, as the
    controller last observed it; ``ready``/``desired`` are None when no status of the agent
    was observed (``unobserved`` says why)."""

    def __init__(
        self,
        *,
        agent: str,
        track: str,
        share: str,
        ready: int | None,
        desired: int | None,
        advice: str = "",
        unobserved: str = "",
    ) -> None:
        self.agent = agent
        self.track = track
        self.ready = ready
        self.desired = desired
        if ready is None:
            seen = f"but its ready instances are unknown: {unobserved}"
        else:
            seen = f"which has {ready} ready of {desired} desired instance(s)"
        advice = f"{advice}; or " if advice else ""
        super().__init__(
            f"release of agent {agent!r} sends {share} to track {track}, {seen}; "
            f"{advice}pass --allow-empty (allow_empty) to set it anyway"
        )


@dataclass(frozen=True)
class ErrorMapping:
    """How one kind of error is answered, on every transport."""

    error: type[BaseException]
    http_status: int
    grpc_status: grpc.StatusCode
    reason: str
    """The stable machine-readable name: REST ``error.code``, gRPC trailing metadata
    ``specmesh-error-reason``."""


ERROR_TABLE: tuple[ErrorMapping, ...] = (
    ErrorMapping(UnauthenticatedError, 401, grpc.StatusCode.UNAUTHENTICATED, "unauthenticated"),
    ErrorMapping(
        PermissionDeniedError, 403, grpc.StatusCode.PERMISSION_DENIED, "permission_denied"
    ),
    ErrorMapping(BadRequestError, 400, grpc.StatusCode.INVALID_ARGUMENT, "bad_request"),
    ErrorMapping(BodyTooLargeError, 413, grpc.StatusCode.RESOURCE_EXHAUSTED, "too_large"),
    ErrorMapping(TrackEmptyError, 409, grpc.StatusCode.FAILED_PRECONDITION, "track_empty"),
    ErrorMapping(SpecError, 400, grpc.StatusCode.INVALID_ARGUMENT, "invalid_spec"),
    ErrorMapping(ConflictError, 409, grpc.StatusCode.ABORTED, "conflict"),
    ErrorMapping(NameCollisionError, 409, grpc.StatusCode.ALREADY_EXISTS, "name_collision"),
    ErrorMapping(NotFoundError, 404, grpc.StatusCode.NOT_FOUND, "not_found"),
    ErrorMapping(StoreUnavailableError, 503, grpc.StatusCode.UNAVAILABLE, "store_unavailable"),
    ErrorMapping(SecretUnavailableError, 503, grpc.StatusCode.UNAVAILABLE, "vault_unavailable"),
    ErrorMapping(SecretAccessDeniedError, 403, grpc.StatusCode.PERMISSION_DENIED, "vault_denied"),
    ErrorMapping(SecretReferenceError, 400, grpc.StatusCode.INVALID_ARGUMENT, "bad_reference"),
    ErrorMapping(MeshObjectError, 400, grpc.StatusCode.FAILED_PRECONDITION, "invalid_mesh_object"),
)
"""Every error the API answers with, in order: the first ``isinstance`` match wins."""

INTERNAL = ErrorMapping(Exception, 500, grpc.StatusCode.INTERNAL, "internal")
"""How anything not in :data:`ERROR_TABLE` is answered (its text is never sent)."""

INTERNAL_MESSAGE = "internal error (see the control plane's log)"


def error_mapping(error: BaseException) -> ErrorMapping:
    """The row of :data:`ERROR_TABLE` for ``error``, else :data:`INTERNAL`."""
    for mapping in ERROR_TABLE:
        if isinstance(error, mapping.error):
            return mapping
    return INTERNAL


def status_for(error: BaseException) -> tuple[int, grpc.StatusCode, str]:
    """(HTTP status, gRPC status, reason) of an error."""
    m = error_mapping(error)
    return m.http_status, m.grpc_status, m.reason


def error_message(error: BaseException) -> str:
    """The one text of an error on every transport: a :class:`SpecError` lists its issues
    as ``path: message`` lines; an unexpected error says only where to look."""
    if error_mapping(error) is INTERNAL:
        return INTERNAL_MESSAGE
    if isinstance(error, SpecError):
        n = len(error.issues)
        lines = "\n".join(str(i) for i in error.issues)
        return f"{n} problem{'s' if n != 1 else ''} in spec:\n{lines}"
    return str(error)


def error_body(error: BaseException) -> dict[str, Any]:
    """The JSON error body of every REST error."""
    _, _, reason = status_for(error)
    body: dict[str, Any] = {"code": reason, "message": str(error) if reason != "internal" else
                            INTERNAL_MESSAGE}  # fmt: skip
    if isinstance(error, SpecError):
        body["issues"] = [
            {"path": i.path, "rule": i.rule, "message": i.message, "severity": i.severity}
            for i in error.issues
        ]
    return {"error": body}
