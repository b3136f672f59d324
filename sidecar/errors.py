"""Errors of the sidecar: its data plane's answers (one table) and its spec sync, sync
server, registry and operations.

Every error derives from :class:`SidecarError` and carries fields; :func:`grpc_status`
maps each one to the gRPC status the sync server answers with::

    SidecarError
    +-- PolicyError              a call the data plane answers itself (``reason``,
    |   |                        ``message``, ``fields``): HTTP status, gRPC status and
    |   |                        A2A error from :data:`POLICY_ERRORS`, the same on every
    |   |                        listener (HTTP and gRPC; egress, inbound and entry)
    |   +-- CallerRefused        (``sidecar.callers``) UNAUTHENTICATED / PERMISSION_DENIED
    +-- AgentMismatchError       the engine asked for another agent (``expected``, ``got``)
    +-- SnapshotUnavailableError no valid snapshot yet (``agent``, ``reason``)
    +-- InvalidSnapshotError     resolving the watched keys failed (``agent``,
    |                            ``etcd_revision``, ``reason``); the last good one stays
    +-- SnapshotCacheError       the on-disk snapshot cannot be read or written (``path``)
    +-- ListenAddressError       a listener address is malformed (``address``, ``reason``)
    +-- RegistryError            the Agent Registry entry could not be written (``key``)

:data:`POLICY_ERRORS` -- ``reason``: HTTP status, gRPC status, A2A error (a2a-sdk class, its
JSON-RPC code) -- drawn as a2a-sdk's ``utils/errors.py`` draws its own:

=========================  ====  ===================  =========================================
reason                     HTTP  gRPC                 when
=========================  ====  ===================  =========================================
INVALID_TARGET             400   INVALID_ARGUMENT     the call names no target, or one that is
                                                      not a valid name (names the rule broken)
UNAUTHENTICATED            401   UNAUTHENTICATED      the caller is not known (no certificate
                                                      naming an agent, a missing/invalid token)
PERMISSION_DENIED          403   PERMISSION_DENIED    the caller may not call this agent
NOT_DECLARED               403   PERMISSION_DENIED    the spec names no such MCP server/partner
BUDGET_EXCEEDED            402   RESOURCE_EXHAUSTED   the call could pass what is left of the
                                                      request's cost budget (names the budget,
                                                      what is left and the call's worst case)
UNKNOWN_ROUTE              404   UNIMPLEMENTED        not an egress route, or no such fallback
UPSTREAM_UNREACHABLE       502   UNAVAILABLE          the upstream cannot be connected to
UPSTREAM_IDENTITY          502   UNAVAILABLE          the partner's certificate is not its own
UPSTREAM_RESET             502   UNAVAILABLE          the upstream closed the connection
UPSTREAM_ERROR             502   UNAVAILABLE          another failure talking to the upstream
UPSTREAM_MISCONFIGURED     502   FAILED_PRECONDITION  the spec/registry gives no usable upstream
ENGINE_UNREACHABLE         502   UNAVAILABLE          the engine beside cannot be reached
NO_SNAPSHOT                503   UNAVAILABLE          the sidecar has no spec yet
NO_INSTANCE                503   UNAVAILABLE          no instance of the partner can take it
OVERFLOW                   503   RESOURCE_EXHAUSTED   too many calls in flight to the partner
CREDENTIAL_UNAVAILABLE     503   UNAVAILABLE          a ``vault://`` reference cannot be
                                                      resolved (names the reference)
UPSTREAM_TIMEOUT           504   DEADLINE_EXCEEDED    the upstream did not answer in time
INTERNAL                   500   INTERNAL             the sidecar failed (logged)
=========================  ====  ===================  =========================================

The A2A error of every row is a2a-sdk's ``InvalidParamsError`` (-32602) for
``INVALID_TARGET``, ``MethodNotFoundError`` (-32601) for ``UNKNOWN_ROUTE``,
``InvalidRequestError`` (-32600) for the refusals (A2A has no authorization error: its
transports answer 401/403 themselves) and ``InternalError`` (-32603) for the rest.

On HTTP an error is AIP-193 JSON, ``{"error": {"code": <HTTP status>, "status": <gRPC
status name>, "message", "details": [google.rpc.ErrorInfo{reason, domain "specmesh.io",
metadata: the error's fields}]}}``; on gRPC the status and message, with that
``google.rpc.Status`` in ``grpc-status-details-bin``. A message names what is wrong and
never holds a secret.

Errors of the libraries underneath (etcd through :mod:`specmesh.errors`, grpc, aiohttp,
pydantic) are translated at the boundary where they occur with ``raise ... from e``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import grpc
from a2a.utils.errors import (
    JSON_RPC_ERROR_CODE_MAP,
    A2AError,
    InternalError,
    InvalidParamsError,
    InvalidRequestError,
    MethodNotFoundError,
)
from aiohttp import web
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]

__all__ = [
    "ERROR_DOMAIN",
    "POLICY_ERRORS",
    "AgentMismatchError",
    "ErrorMapping",
    "InvalidSnapshotError",
    "ListenAddressError",
    "PolicyError",
    "RegistryError",
    "SidecarError",
    "SnapshotCacheError",
    "SnapshotUnavailableError",
    "grpc_status",
]


class SidecarError(Exception):
    """Base of every sidecar error."""


ERROR_DOMAIN = "specmesh.io"
"""``google.rpc.ErrorInfo.domain`` of every error the sidecar answers."""


class ErrorMapping(NamedTuple):
    """One row of :data:`POLICY_ERRORS`."""

    http_status: int
    grpc_code: grpc.StatusCode
    a2a_error: type[A2AError]

    @property
    def a2a_code(self) -> int:
        """The A2A error's JSON-RPC code."""
        return JSON_RPC_ERROR_CODE_MAP[self.a2a_error]


_S = grpc.StatusCode
POLICY_ERRORS: dict[str, ErrorMapping] = {
    "INVALID_TARGET": ErrorMapping(400, _S.INVALID_ARGUMENT, InvalidParamsError),
    "UNAUTHENTICATED": ErrorMapping(401, _S.UNAUTHENTICATED, InvalidRequestError),
    "PERMISSION_DENIED": ErrorMapping(403, _S.PERMISSION_DENIED, InvalidRequestError),
    "NOT_DECLARED": ErrorMapping(403, _S.PERMISSION_DENIED, InvalidRequestError),
    "BUDGET_EXCEEDED": ErrorMapping(402, _S.RESOURCE_EXHAUSTED, InvalidRequestError),
    "UNKNOWN_ROUTE": ErrorMapping(404, _S.UNIMPLEMENTED, MethodNotFoundError),
    "UPSTREAM_UNREACHABLE": ErrorMapping(502, _S.UNAVAILABLE, InternalError),
    "UPSTREAM_IDENTITY": ErrorMapping(502, _S.UNAVAILABLE, InternalError),
    "UPSTREAM_RESET": ErrorMapping(502, _S.UNAVAILABLE, InternalError),
    "UPSTREAM_ERROR": ErrorMapping(502, _S.UNAVAILABLE, InternalError),
    "UPSTREAM_MISCONFIGURED": ErrorMapping(502, _S.FAILED_PRECONDITION, InternalError),
    "ENGINE_UNREACHABLE": ErrorMapping(502, _S.UNAVAILABLE, InternalError),
    "NO_SNAPSHOT": ErrorMapping(503, _S.UNAVAILABLE, InternalError),
    "NO_INSTANCE": ErrorMapping(503, _S.UNAVAILABLE, InternalError),
    "OVERFLOW": ErrorMapping(503, _S.RESOURCE_EXHAUSTED, InternalError),
    "CREDENTIAL_UNAVAILABLE": ErrorMapping(503, _S.UNAVAILABLE, InternalError),
    "UPSTREAM_TIMEOUT": ErrorMapping(504, _S.DEADLINE_EXCEEDED, InternalError),
    "INTERNAL": ErrorMapping(500, _S.INTERNAL, InternalError),
}
"""reason -> (HTTP status, gRPC status, A2A error): the one table (see the module docstring)."""


class PolicyError(SidecarError):
    """A call the data plane answers itself, rendered from :data:`POLICY_ERRORS` for HTTP
    (:meth:`http_response`), gRPC (:meth:`grpc_trailers` with :attr:`grpc_code`) and A2A
    (:meth:`to_a2a`). ``fields`` (strings) name what it is about and become the
    ``ErrorInfo``'s metadata; never a secret."""

    def __init__(self, reason: str, message: str, **fields: str) -> None:
        if reason not in POLICY_ERRORS:
            raise ValueError(f"no row {reason!r} in POLICY_ERRORS")
        self.reason = reason
        self.message = message
        self.fields = fields
        self.mapping = POLICY_ERRORS[reason]
        super().__init__(message)

    @property
    def http_status(self) -> int:
        return self.mapping.http_status

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return self.mapping.grpc_code

    def http_body(self) -> dict[str, Any]:
        """AIP-193 error JSON (a ``google.rpc.Status`` with one ``ErrorInfo``)."""
        info = {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": self.reason,
            "domain": ERROR_DOMAIN,
            "metadata": self.fields,
        }
        return {
            "error": {
                "code": self.mapping.http_status,
                "status": self.mapping.grpc_code.name,
                "message": self.message,
                "details": [info],
            }
        }

    def http_headers(self) -> dict[str, str]:
        """Headers the HTTP answer carries besides the body (none by default)."""
        return {}

    def http_response(self) -> web.Response:
        return web.json_response(
            self.http_body(), status=self.mapping.http_status, headers=self.http_headers()
        )

    def rpc_status(self) -> status_pb2.Status:
        """The ``google.rpc.Status`` of this error (with its ``ErrorInfo``)."""
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=ERROR_DOMAIN, metadata=self.fields
        )
        detail = any_pb2.Any()
        detail.Pack(info)
        return status_pb2.Status(
            code=self.mapping.grpc_code.value[0], message=self.message, details=[detail]
        )

    def grpc_trailers(self) -> tuple[tuple[str, bytes], ...]:
        """Trailing metadata of the gRPC answer (``grpc-status-details-bin``)."""
        return (("grpc-status-details-bin", self.rpc_status().SerializeToString()),)

    def to_a2a(self) -> A2AError:
        """The a2a-sdk error of this row, with this message and the fields as its data."""
        return self.mapping.a2a_error(self.message, data={"reason": self.reason, **self.fields})


class AgentMismatchError(SidecarError):
    """The engine named an agent other than the sidecar's own: a mis-wired pair."""

    def __init__(self, *, expected: str, got: str) -> None:
        self.expected = expected
        self.got = got
        super().__init__(f"this sidecar serves agent {expected!r}, not {got!r}")


class SnapshotUnavailableError(SidecarError):
    """No valid snapshot yet (etcd unreachable and nothing on disk, or no such agent)."""

    def __init__(self, *, agent: str, reason: str) -> None:
        self.agent = agent
        self.reason = reason
        super().__init__(f"no snapshot of agent {agent!r} yet: {reason}")


class InvalidSnapshotError(SidecarError):
    """The watched keys do not resolve to a valid snapshot; the last good one stays."""

    def __init__(self, *, agent: str, etcd_revision: int, reason: str) -> None:
        self.agent = agent
        self.etcd_revision = etcd_revision
        self.reason = reason
        super().__init__(
            f"agent {agent!r} at etcd revision {etcd_revision} does not resolve: {reason}"
        )


class SnapshotCacheError(SidecarError):
    """The last good snapshot on disk cannot be read or written."""

    def __init__(self, *, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"snapshot cache {path}: {reason}")


class ListenAddressError(SidecarError):
    """A listener address is not ``host:port`` or ``unix:path``."""

    def __init__(self, *, address: str, reason: str) -> None:
        self.address = address
        self.reason = reason
        super().__init__(f"bad listen address {address!r}: {reason}")


class RegistryError(SidecarError):
    """The instance's Agent Registry entry could not be written."""

    def __init__(self, *, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"registry entry {key}: {reason}")


_GRPC_STATUS: dict[type[SidecarError], grpc.StatusCode] = {
    AgentMismatchError: grpc.StatusCode.FAILED_PRECONDITION,
    SnapshotUnavailableError: grpc.StatusCode.UNAVAILABLE,
    InvalidSnapshotError: grpc.StatusCode.FAILED_PRECONDITION,
    SnapshotCacheError: grpc.StatusCode.INTERNAL,
    ListenAddressError: grpc.StatusCode.INVALID_ARGUMENT,
    RegistryError: grpc.StatusCode.UNAVAILABLE,
}


def grpc_status(error: SidecarError) -> grpc.StatusCode:
    """The gRPC status code for ``error`` (``INTERNAL`` for an unlisted subclass)."""
    if isinstance(error, PolicyError):
        return error.grpc_code
    for cls in type(error).__mro__:
        if cls in _GRPC_STATUS:
            return _GRPC_STATUS[cls]
    return grpc.StatusCode.INTERNAL
