"""Errors of the control plane's API, and the one table that maps every error to its
HTTP status and gRPC status code::

    SpecmeshError
    +-- ApiError
    |   +-- UnauthenticatedError    no or unknown bearer token        401 / UNAUTHENTICATED
    |   +-- PermissionDeniedError   the role may not do this          403 / PERMISSION_DENIED
    |   +-- BadRequestError         a malformed request body/param    400 / INVALID_ARGUMENT
    |   +-- BodyTooLargeError       a request body over the limit     413 / RESOURCE_EXHAUSTED
    +-- (core errors, see specmesh.errors)
        SpecError                                                     400 / INVALID_ARGUMENT
        ConflictError, NameCollisionError                             409 / ABORTED
        NotFoundError                                                 404 / NOT_FOUND
        StoreUnavailableError, SecretUnavailableError                 503 / UNAVAILABLE
        SecretAccessDeniedError                                       403 / PERMISSION_DENIED
        SecretReferenceError                                          400 / INVALID_ARGUMENT
        MeshObjectError (rendered Istio objects invalid)             400 / FAILED_PRECONDITION
        anything else                                                 500 / INTERNAL
"""

from __future__ import annotations

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
    "ApiError",
    "BadRequestError",
    "BodyTooLargeError",
    "PermissionDeniedError",
    "UnauthenticatedError",
    "error_body",
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


_TABLE: list[tuple[type[BaseException], int, grpc.StatusCode, str]] = [
    (UnauthenticatedError, 401, grpc.StatusCode.UNAUTHENTICATED, "unauthenticated"),
    (PermissionDeniedError, 403, grpc.StatusCode.PERMISSION_DENIED, "permission_denied"),
    (BadRequestError, 400, grpc.StatusCode.INVALID_ARGUMENT, "bad_request"),
    (BodyTooLargeError, 413, grpc.StatusCode.RESOURCE_EXHAUSTED, "too_large"),
    (SpecError, 400, grpc.StatusCode.INVALID_ARGUMENT, "invalid_spec"),
    (ConflictError, 409, grpc.StatusCode.ABORTED, "conflict"),
    (NameCollisionError, 409, grpc.StatusCode.ALREADY_EXISTS, "name_collision"),
    (NotFoundError, 404, grpc.StatusCode.NOT_FOUND, "not_found"),
    (StoreUnavailableError, 503, grpc.StatusCode.UNAVAILABLE, "store_unavailable"),
    (SecretUnavailableError, 503, grpc.StatusCode.UNAVAILABLE, "vault_unavailable"),
    (SecretAccessDeniedError, 403, grpc.StatusCode.PERMISSION_DENIED, "vault_denied"),
    (SecretReferenceError, 400, grpc.StatusCode.INVALID_ARGUMENT, "bad_reference"),
    (MeshObjectError, 400, grpc.StatusCode.FAILED_PRECONDITION, "invalid_mesh_object"),
]


def status_for(error: BaseException) -> tuple[int, grpc.StatusCode, str]:
    """(HTTP status, gRPC status, reason) of an error."""
    for kind, http, code, reason in _TABLE:
        if isinstance(error, kind):
            return http, code, reason
    return 500, grpc.StatusCode.INTERNAL, "internal"


def error_body(error: BaseException) -> dict[str, Any]:
    """The JSON error body of every REST error."""
    _, _, reason = status_for(error)
    body: dict[str, Any] = {"code": reason, "message": str(error) if reason != "internal" else
                            "internal error (see the control plane's log)"}  # fmt: skip
    if isinstance(error, SpecError):
        body["issues"] = [
            {"path": i.path, "rule": i.rule, "message": i.message, "severity": i.severity}
            for i in error.issues
        ]
    return {"error": body}
