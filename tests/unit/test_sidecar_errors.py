"""Every sidecar error has its gRPC status in the one table."""

from __future__ import annotations

import inspect

import grpc

import sidecar.errors as errors
from sidecar.errors import SidecarError, grpc_status


def _concrete() -> list[type[SidecarError]]:
    return [
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, SidecarError) and cls is not SidecarError
    ]


def test_every_error_is_mapped_and_exported() -> None:
    table = errors._GRPC_STATUS
    for cls in _concrete():
        # a PolicyError (and CallerRefused) takes its status from POLICY_ERRORS, by reason
        assert cls in table or cls is errors.PolicyError, f"{cls.__name__} has no gRPC status"
        assert cls.__name__ in errors.__all__
        assert cls.__name__ in (errors.__doc__ or ""), f"{cls.__name__} missing from the tree"


def test_statuses() -> None:
    assert (
        grpc_status(errors.AgentMismatchError(expected="a", got="b"))
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    assert (
        grpc_status(errors.SnapshotUnavailableError(agent="a", reason="waiting for etcd"))
        == grpc.StatusCode.UNAVAILABLE
    )
    assert grpc_status(SidecarError("x")) == grpc.StatusCode.INTERNAL
    assert (
        grpc_status(errors.PolicyError("NOT_DECLARED", "no")) == grpc.StatusCode.PERMISSION_DENIED
    )
