"""The one error table of the control plane's API (control_plane/errors.py): every error
maps to one HTTP status, gRPC status and reason, for REST and gRPC alike."""

from __future__ import annotations

import grpc

from control_plane import errors as api_errors
from control_plane.errors import (
    ERROR_TABLE,
    INTERNAL,
    BadRequestError,
    error_body,
    error_mapping,
    error_message,
)
from specmesh import errors as core_errors
from specmesh.errors import ConflictError, NameCollisionError, SpecError, SpecIssue


def test_each_reason_is_one_row_with_a_client_or_server_status() -> None:
    reasons = [m.reason for m in ERROR_TABLE]
    assert len(reasons) == len(set(reasons))
    assert all(400 <= m.http_status < 600 for m in ERROR_TABLE)
    assert all(
        m.grpc_status not in (grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN) for m in ERROR_TABLE
    )


def test_every_api_error_class_is_in_the_table() -> None:
    classes = [
        c
        for c in vars(api_errors).values()
        if isinstance(c, type)
        and issubclass(c, api_errors.ApiError)
        and c is not api_errors.ApiError
    ]
    assert classes and all(error_mapping(c.__new__(c)) is not INTERNAL for c in classes)


def test_the_more_specific_row_wins() -> None:
    collision = NameCollisionError(name="a", existing="A", resource_name="a")
    conflict = ConflictError(kind="agent", name="a", expected=1, actual=2)
    assert error_mapping(collision).grpc_status == grpc.StatusCode.ALREADY_EXISTS
    assert error_mapping(conflict).grpc_status == grpc.StatusCode.ABORTED
    assert issubclass(NameCollisionError, core_errors.SpecmeshError)


def test_an_unexpected_error_is_internal_and_its_text_never_sent() -> None:
    error = RuntimeError("db password is hunter2")
    assert error_mapping(error) is INTERNAL and INTERNAL.http_status == 500
    assert "hunter2" not in error_message(error) + str(error_body(error))


def test_a_spec_error_lists_its_issues_on_every_transport() -> None:
    error = SpecError([SpecIssue("model.temperature", "le", "must be <= 2 (got 7)")])
    assert error_message(error) == "1 problem in spec:\nmodel.temperature: must be <= 2 (got 7)"
    assert error_body(error)["error"]["issues"][0]["path"] == "model.temperature"
    assert error_message(BadRequestError("x: required")) == "x: required"
