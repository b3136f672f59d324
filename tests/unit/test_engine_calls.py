"""The sidecar's count of the calls it relays to its engine: kind and outcome of HTTP and
gRPC answers (a failed A2A task is a failure even under HTTP 200), by revision."""

from __future__ import annotations

import json

import grpc
from a2a.types import a2a_pb2
from prometheus_client import CollectorRegistry

from control_plane.sidecar_metrics import ERROR_OUTCOMES as CONTROL_PLANE_ERRORS
from control_plane.sidecar_metrics import parse_metrics
from sidecar.engine_calls import ERROR_OUTCOMES as SIDECAR_ERRORS
from sidecar.engine_calls import EngineCalls, http_kind


def _calls(revision: int = 4) -> tuple[EngineCalls, CollectorRegistry]:
    registry = CollectorRegistry()
    return EngineCalls(registry=registry, revision=lambda: revision), registry


def _outcomes(registry: CollectorRegistry) -> dict[tuple[str, str, str], float]:
    out = {}
    for metric in registry.collect():
        for s in metric.samples:
            if s.name == "specmesh_sidecar_engine_requests_total":
                out[(s.labels["revision"], s.labels["kind"], s.labels["outcome"])] = s.value
    return out


def _sse(*events: dict[str, object]) -> list[bytes]:
    return [f"data: {json.dumps(e)}\n\n".encode() for e in events]


def _status(state: str) -> dict[str, object]:
    return {"jsonrpc": "2.0", "id": 1, "result": {"statusUpdate": {"status": {"state": state}}}}


def test_a_turn_is_told_from_other_calls() -> None:
    send = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "SendStreamingMessage"}).encode()
    assert http_kind("POST", "/", send) == "message"
    assert http_kind("POST", "/v1/message:send", None) == "message"
    assert http_kind("POST", "/tenant/v1/message:stream", None) == "message"
    assert http_kind("POST", "/v1/invoke", b"{}") == "message"
    assert http_kind("GET", "/.well-known/agent-card.json", None) == "other"
    assert http_kind("POST", "/", b'{"method": "GetTask"}') == "other"


def test_http_answers_are_counted_by_outcome_and_revision() -> None:
    calls, registry = _calls()
    ok = calls.begin("message")
    ok.begin_body("application/json")
    ok.feed(b'{"jsonrpc": "2.0", "id": 1, "result": {"task": {"status": ')
    ok.feed(b'{"state": "TASK_STATE_COMPLETED"}}}}')
    ok.finish_http(200)
    failed = calls.begin("message")
    failed.begin_body("application/json")
    failed.feed(b'{"result": {"task": {"status": {"state": "TASK_STATE_FAILED"}}}}')
    failed.finish_http(200)
    internal = calls.begin("message")
    internal.begin_body("application/json")
    internal.feed(b'{"jsonrpc": "2.0", "id": 1, "error": {"code": -32603, "message": "x"}}')
    internal.finish_http(200)
    not_found = calls.begin("message")
    not_found.begin_body("application/json")
    not_found.feed(b'{"jsonrpc": "2.0", "id": 1, "error": {"code": -32001, "message": "x"}}')
    not_found.finish_http(200)
    five = calls.begin("message")
    five.finish_http(500)
    four = calls.begin("other")
    four.finish_http(404)
    calls.begin("message").finish("unreachable")

    assert _outcomes(registry) == {
        ("4", "message", "ok"): 1,
        ("4", "message", "a2a_error"): 2,
        ("4", "message", "client_error"): 1,
        ("4", "message", "http_5xx"): 1,
        ("4", "other", "client_error"): 1,
        ("4", "message", "unreachable"): 1,
    }


def test_a_stream_is_judged_by_its_last_state_read_line_by_line() -> None:
    calls, registry = _calls()
    failed = calls.begin("message")
    failed.begin_body("text/event-stream")
    body = b"".join(_sse(_status("TASK_STATE_WORKING"), _status("TASK_STATE_FAILED")))
    for i in range(0, len(body), 7):  # chunks cut anywhere
        failed.feed(body[i : i + 7])
    failed.finish_http(200)
    completed = calls.begin("message")
    completed.begin_body("text/event-stream")
    for chunk in _sse(_status("TASK_STATE_WORKING"), _status("TASK_STATE_COMPLETED")):
        completed.feed(chunk)
    completed.finish_http(200)
    cut = calls.begin("message")
    cut.begin_body("text/event-stream")
    cut.feed(_sse(_status("TASK_STATE_WORKING"))[0])
    cut.broken = "timeout"
    cut.finish_http(200)

    assert _outcomes(registry) == {
        ("4", "message", "a2a_error"): 1,
        ("4", "message", "ok"): 1,
        ("4", "message", "timeout"): 1,
    }


def test_grpc_answers_are_counted_by_status_and_task_state() -> None:
    calls, registry = _calls(revision=7)
    failed_task = a2a_pb2.SendMessageResponse(
        task=a2a_pb2.Task(status=a2a_pb2.TaskStatus(state=a2a_pb2.TaskState.TASK_STATE_FAILED))
    )
    unary = calls.begin_grpc("SendMessage")
    unary.grpc_code(grpc.StatusCode.OK)
    unary.grpc_message(failed_task.SerializeToString(), streaming=False)
    unary.finish_grpc()
    done = a2a_pb2.StreamResponse(
        status_update=a2a_pb2.TaskStatusUpdateEvent(
            status=a2a_pb2.TaskStatus(state=a2a_pb2.TaskState.TASK_STATE_COMPLETED)
        )
    )
    stream = calls.begin_grpc("SendStreamingMessage")
    stream.grpc_message(done.SerializeToString(), streaming=True)
    stream.grpc_code(grpc.StatusCode.OK)
    stream.finish_grpc()
    for code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED):
        call = calls.begin_grpc("SendMessage")
        call.grpc_code(code)
        call.finish_grpc()
    left = calls.begin_grpc("SendStreamingMessage")
    left.finish_grpc()  # the caller left: no status reported
    lookup = calls.begin_grpc("GetTask")
    lookup.grpc_code(grpc.StatusCode.NOT_FOUND)
    lookup.finish_grpc()

    assert _outcomes(registry) == {
        ("7", "message", "a2a_error"): 1,
        ("7", "message", "ok"): 1,
        ("7", "message", "grpc_error"): 1,
        ("7", "message", "timeout"): 1,
        ("7", "message", "cancelled"): 1,
        ("7", "other", "client_error"): 1,
    }


def test_the_control_plane_parses_what_the_sidecar_exposes() -> None:
    from prometheus_client import generate_latest

    calls, registry = _calls(revision=3)
    for outcome, seconds in (("ok", 0.07), ("ok", 0.3), ("http_5xx", 1.5), ("cancelled", 9)):
        calls.record(3, "message", outcome, seconds)
    calls.record(3, "other", "ok", 0.01)  # not a turn
    calls.record(0, "message", "ok", 0.01)  # no snapshot yet: no revision

    parsed = parse_metrics(generate_latest(registry).decode())

    assert set(parsed) == {3}
    counts = parsed[3]
    assert (counts.requests, counts.errors) == (3, 1)  # the cancelled call is not counted
    assert counts.buckets[0.1] == 1 and counts.buckets[2.0] == 3
    assert counts.buckets[float("inf")] == 3  # nor is its duration


def test_both_sides_agree_on_what_an_error_is() -> None:
    assert SIDECAR_ERRORS == CONTROL_PLANE_ERRORS
