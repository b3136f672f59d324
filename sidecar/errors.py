"""Errors of the sidecar's spec sync, sync server, registry and operations.

Every error derives from :class:`SidecarError` and carries fields; :func:`grpc_status`
maps each one to the gRPC status the sync server answers with (one table)::

    SidecarError
    +-- AgentMismatchError       the engine asked for another agent (``expected``, ``got``)
    +-- SnapshotUnavailableError no valid snapshot yet (``agent``, ``reason``)
    +-- InvalidSnapshotError     resolving the watched keys failed (``agent``,
    |                            ``etcd_revision``, ``reason``); the last good one stays
    +-- SnapshotCacheError       the on-disk snapshot cannot be read or written (``path``)
    +-- ListenAddressError       a listener address is malformed (``address``, ``reason``)
    +-- RegistryError            the Agent Registry entry could not be written (``key``)

Errors of the libraries underneath (etcd through :mod:`specmesh.errors`, grpc, aiohttp,
pydantic) are translated at the boundary where they occur with ``raise ... from e``.
"""

from __future__ import annotations

from pathlib import Path

import grpc

__all__ = [
    "AgentMismatchError",
    "InvalidSnapshotError",
    "ListenAddressError",
    "RegistryError",
    "SidecarError",
    "SnapshotCacheError",
    "SnapshotUnavailableError",
    "grpc_status",
]


class SidecarError(Exception):
    """Base of every sidecar error."""


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
    for cls in type(error).__mro__:
        if cls in _GRPC_STATUS:
            return _GRPC_STATUS[cls]
    return grpc.StatusCode.INTERNAL
