"""The engine's servers on loopback, behind a ScriptedRunner, spoken to by real clients.

A2A through the official a2a-sdk client over JSON-RPC, HTTP+JSON and gRPC; business REST
and health through httpx; gRPC health through its stub. Nothing is mocked but the
runtime (the ScriptedRunner, the in-memory AgentRunner).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest
from a2a.client import Client, ClientCallContext, ClientConfig, create_client
from a2a.client.card_resolver import parse_agent_card
from a2a.types.a2a_pb2 import (
    CancelTaskRequest,
    GetTaskRequest,
    Message,
    Part,
    Role,
    SendMessageRequest,
    StreamResponse,
    TaskState,
)
from a2a.utils.constants import TransportProtocol
from a2a.utils.proto_utils import validate_proto_required_fields
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from engine.card import BEARER_SCHEME
from engine.main import serve
from engine.server import A2A_SERVICE, EngineServer, ServerConfig
from engine.telemetry import EngineMetrics, install_memory_exporter
from engine.testing import DEFAULT_CARD, ScriptedRunner, ScriptedTurn
from engine.turn_protocol import CardInfo
from tests.polling import eventually

BINDINGS = [TransportProtocol.JSONRPC, TransportProtocol.HTTP_JSON, TransportProtocol.GRPC]
WAIT = 10.0

_EXPORTER: InMemorySpanExporter | None = None


def _exporter() -> InMemorySpanExporter:
    global _EXPORTER
    if _EXPORTER is None:
        _EXPORTER = install_memory_exporter()
    return _EXPORTER


def _config(**overrides: Any) -> ServerConfig:
    values: dict[str, Any] = {
        "agent_name": "scripted-agent",
        "http_port": 0,
        "grpc_port": 0,
        "drain_timeout": 5.0,
        "readiness_interval": 0.02,
    }
    values.update(overrides)
    return ServerConfig(**values)


@pytest.fixture(scope="module")
async def runner() -> ScriptedRunner:
    return ScriptedRunner()


@pytest.fixture(scope="module")
async def server(runner: ScriptedRunner) -> AsyncIterator[EngineServer]:
    _exporter()
    async with EngineServer(runner=runner, config=_config()) as s:
        yield s


@pytest.fixture(autouse=True)
def _reset(runner: ScriptedRunner) -> None:
    runner.set_ready(True)
    runner.set_card(DEFAULT_CARD)


@pytest.fixture
async def http(server: EngineServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.http_url, timeout=WAIT) as client:
        yield client


async def _client(server: EngineServer, binding: str, *, streaming: bool) -> Client:
    config = ClientConfig(
        streaming=streaming,
        supported_protocol_bindings=[binding],
        grpc_channel_factory=grpc.aio.insecure_channel,
    )
    return await create_client(server.http_url, client_config=config)


def _message(text: str, *, context_id: str | None = None) -> SendMessageRequest:
    return SendMessageRequest(
        message=Message(
            role=Role.ROLE_USER,
            message_id=uuid.uuid4().hex,
            context_id=context_id or "",
            parts=[Part(text=text)],
        )
    )


def _headers(**values: str) -> ClientCallContext:
    return ClientCallContext(service_parameters=dict(values), timeout=WAIT)


async def _collect(stream: AsyncIterator[StreamResponse]) -> list[StreamResponse]:
    async with asyncio.timeout(WAIT):
        return [event async for event in stream]


# ---------------------------------------------------------------- A2A


@pytest.mark.parametrize("binding", BINDINGS)
async def test_send_returns_the_completed_task(
    server: EngineServer, runner: ScriptedRunner, binding: str
) -> None:
    context_id = f"ctx-{uuid.uuid4().hex[:8]}"
    async with await _client(server, binding, streaming=False) as client:
        events = await _collect(
            client.send_message(
                _message("hello", context_id=context_id),
                context=_headers(**{"X-Specmesh-Call-Depth": "2"}),
            )
        )

    assert len(events) == 1 and events[0].HasField("task")
    task = events[0].task
    assert task.status.state == TaskState.TASK_STATE_COMPLETED
    assert task.context_id == context_id
    [artifact] = task.artifacts
    assert [p.text for p in artifact.parts] == ["echo: hello"]
    assert artifact.metadata["revision"] == 1
    assert artifact.metadata["promptVersion"] == "v1"
    request = runner.requests[-1]
    assert (request.context_id, request.text, request.call_depth) == (context_id, "hello", 2)
    assert request.task_id == task.id
    assert request.headers == {"x-specmesh-call-depth": "2"}


@pytest.mark.parametrize("binding", BINDINGS)
async def test_stream_sends_answer_chunks_then_completed(
    server: EngineServer, runner: ScriptedRunner, binding: str
) -> None:
    runner.enqueue(
        ScriptedTurn.answer(
            "Nacos keeps config.",
            chunks=["Nacos ", "keeps ", "config."],
            tool_calls=[("docs__search", {"q": "nacos"}, "found")],
        )
    )
    async with await _client(server, binding, streaming=True) as client:
        events = await _collect(client.send_message(_message("what is nacos?")))

    chunks = [e.artifact_update for e in events if e.HasField("artifact_update")]
    assert [c.artifact.parts[0].text for c in chunks] == [
        "Nacos ",
        "keeps ",
        "config.",
        "Nacos keeps config.",
    ]
    assert [c.append for c in chunks] == [False, True, True, False]
    assert [c.last_chunk for c in chunks] == [False, False, False, True]
    statuses = [e.status_update for e in events if e.HasField("status_update")]
    tool_states = [s.metadata["toolCall"]["state"] for s in statuses if "toolCall" in s.metadata]
    assert tool_states == ["started", "finished"]
    assert statuses[-1].status.state == TaskState.TASK_STATE_COMPLETED
    assert events[-1].HasField("status_update")


@pytest.mark.parametrize("binding", BINDINGS)
async def test_get_task_returns_the_whole_answer(server: EngineServer, binding: str) -> None:
    async with await _client(server, binding, streaming=True) as client:
        events = await _collect(client.send_message(_message("one two three")))
        task_id = events[-1].status_update.task_id
        task = await client.get_task(GetTaskRequest(id=task_id), context=_headers())

    assert task.status.state == TaskState.TASK_STATE_COMPLETED
    [artifact] = task.artifacts
    assert [p.text for p in artifact.parts] == ["echo: one two three"]
    assert [m.parts[0].text for m in task.history if m.role == Role.ROLE_USER] == ["one two three"]


@pytest.mark.parametrize("binding", BINDINGS)
async def test_cancel_stops_the_running_turn(
    server: EngineServer, runner: ScriptedRunner, binding: str
) -> None:
    turn = runner.enqueue(ScriptedTurn.answer("never finished", hold_after=1))
    async with await _client(server, binding, streaming=True) as client:
        stream = client.send_message(_message("take your time"))
        async with asyncio.timeout(WAIT):
            first = await anext(stream)
            await turn.held.wait()
        task_id = first.task.id if first.HasField("task") else first.status_update.task_id

        cancelled = await client.cancel_task(CancelTaskRequest(id=task_id), context=_headers())
        async with asyncio.timeout(WAIT):
            await turn.cancelled.wait()
            rest = [event async for event in stream]
        stored = await client.get_task(GetTaskRequest(id=task_id), context=_headers())

    assert cancelled.status.state == TaskState.TASK_STATE_CANCELED
    assert stored.status.state == TaskState.TASK_STATE_CANCELED
    assert turn.finished.is_set()
    final = [e.status_update.status.state for e in rest if e.HasField("status_update")]
    assert final[-1] == TaskState.TASK_STATE_CANCELED  # the stream ends with the cancel


@pytest.mark.parametrize("binding", [TransportProtocol.JSONRPC, TransportProtocol.GRPC])
async def test_failed_turn_reports_failed_with_its_message(
    server: EngineServer, runner: ScriptedRunner, binding: str
) -> None:
    runner.enqueue(ScriptedTurn.failure("step_limit", "too many steps"))
    async with await _client(server, binding, streaming=False) as client:
        [event] = await _collect(client.send_message(_message("loop forever")))

    assert event.task.status.state == TaskState.TASK_STATE_FAILED
    assert event.task.status.message.parts[0].text == "too many steps"
    assert event.task.status.message.metadata["code"] == "step_limit"


async def test_bad_call_depth_is_rejected(server: EngineServer, runner: ScriptedRunner) -> None:
    seen = len(runner.requests)
    async with await _client(server, TransportProtocol.JSONRPC, streaming=False) as client:
        [event] = await _collect(
            client.send_message(
                _message("hi"), context=_headers(**{"X-Specmesh-Call-Depth": "deep"})
            )
        )

    assert event.task.status.state == TaskState.TASK_STATE_REJECTED
    assert "x-specmesh-call-depth" in event.task.status.message.parts[0].text
    assert len(runner.requests) == seen


async def test_the_callers_budget_reaches_the_turn_and_a_bad_one_is_rejected(
    server: EngineServer, runner: ScriptedRunner
) -> None:
    budgeted, bad = _message("hi"), _message("hi")
    budgeted.message.metadata.update({"specmesh.budgetUsd": 0.25})
    bad.message.metadata.update({"specmesh.budgetUsd": -1})
    async with await _client(server, TransportProtocol.JSONRPC, streaming=False) as client:
        [answered] = await _collect(client.send_message(budgeted))
        seen = len(runner.requests)
        [rejected] = await _collect(client.send_message(bad))

    assert answered.task.status.state == TaskState.TASK_STATE_COMPLETED
    assert runner.requests[seen - 1].budget_usd == 0.25
    assert rejected.task.status.state == TaskState.TASK_STATE_REJECTED
    assert rejected.task.status.message.parts[0].text == (
        "metadata specmesh.budgetUsd: must be a non-negative number of USD (got -1.0)"
    )
    assert len(runner.requests) == seen


# ---------------------------------------------------------------- agent card


async def test_agent_card_validates_and_follows_the_spec(
    server: EngineServer, runner: ScriptedRunner, http: httpx.AsyncClient
) -> None:
    response = await http.get("/.well-known/agent-card.json")
    assert response.status_code == 200
    card = parse_agent_card(response.json())
    validate_proto_required_fields(card)
    assert (card.name, card.version) == ("scripted-agent", "1")
    assert {(i.protocol_binding, i.url) for i in card.supported_interfaces} == {
        ("JSONRPC", f"{server.http_url}/"),
        ("HTTP+JSON", f"{server.http_url}/v1"),
        ("GRPC", server.grpc_target),
    }
    assert card.capabilities.streaming
    assert card.security_schemes[BEARER_SCHEME].http_auth_security_scheme.scheme == "Bearer"
    assert [list(r.schemes) for r in card.security_requirements] == [[BEARER_SCHEME]]
    assert [s.id for s in card.skills] == ["echo"]

    runner.set_card(
        CardInfo(
            name="scripted-agent",
            description="Now answers about gateways.",
            revision=2,
            skills=({"id": "gateway", "name": "Gateway", "tags": ["mse"]},),
            streaming=False,
        )
    )
    changed = parse_agent_card((await http.get("/.well-known/agent-card.json")).json())

    assert changed.version == "2"
    assert changed.description == "Now answers about gateways."
    assert [(s.id, list(s.tags)) for s in changed.skills] == [("gateway", ["mse"])]
    assert not changed.capabilities.streaming
    assert (
        response.headers["etag"] != (await http.get("/.well-known/agent-card.json")).headers["etag"]
    )


async def test_agent_card_is_503_until_ready(
    runner: ScriptedRunner, http: httpx.AsyncClient
) -> None:
    runner.set_ready(False)
    response = await http.get("/.well-known/agent-card.json")
    assert response.status_code == 503


# ---------------------------------------------------------------- business REST


async def test_invoke_answers(runner: ScriptedRunner, http: httpx.AsyncClient) -> None:
    runner.enqueue(
        ScriptedTurn.answer("It is 42.", citations=[{"source": "kb://answers", "score": 0.9}])
    )
    response = await http.post(
        "/v1/invoke",
        json={"contextId": "conv-1", "message": "the answer?", "budgetUsd": 0.5},
        headers={"X-Specmesh-Call-Depth": "1"},
    )

    assert response.status_code == 200
    assert response.json() == {
        "contextId": "conv-1",
        "answer": "It is 42.",
        "revision": 1,
        "promptVersion": "v1",
        "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12},
        "citations": [{"source": "kb://answers", "score": 0.9}],
    }
    assert runner.requests[-1].call_depth == 1
    assert runner.requests[-1].budget_usd == 0.5


async def test_invoke_starts_a_conversation_without_context_id(
    http: httpx.AsyncClient,
) -> None:
    response = await http.post("/v1/invoke", json={"message": "hi"})
    assert response.status_code == 200
    assert response.json()["contextId"]


async def test_invoke_stream_sends_server_sent_events(
    runner: ScriptedRunner, http: httpx.AsyncClient
) -> None:
    runner.enqueue(
        ScriptedTurn.answer(
            "Hi there", chunks=["Hi ", "there"], tool_calls=[("t__now", {}, "noon")]
        )
    )
    events: list[tuple[str, dict[str, Any]]] = []
    async with http.stream("POST", "/v1/invoke/stream", json={"message": "hello"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        name = ""
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))

    assert [n for n, _ in events] == ["tool_call", "tool_result", "delta", "delta", "done"]
    assert events[0][1] == {"callId": "call-0", "name": "t__now", "arguments": {}}
    assert events[1][1]["result"] == "noon"
    assert "".join(d["text"] for n, d in events if n == "delta") == "Hi there"
    assert events[-1][1]["answer"] == "Hi there"


async def test_invoke_stream_reports_a_failed_turn(
    runner: ScriptedRunner, http: httpx.AsyncClient
) -> None:
    runner.enqueue(ScriptedTurn.failure("model_unavailable", "the model is unavailable"))
    response = await http.post("/v1/invoke/stream", json={"message": "hello"})
    assert "event: error" in response.text
    assert '"code": "model_unavailable"' in response.text


@pytest.mark.parametrize(
    ("body", "headers", "expected"),
    [
        (b"{not json", {}, "body: is not valid JSON"),
        (b"[1, 2]", {}, "body: must be a JSON object"),
        (b"{}", {}, "message: is required"),
        (b'{"message": 5}', {}, "message: input should be a valid string"),
        (b'{"message": ""}', {}, "message: string should have at least 1 character"),
        (b'{"message": "hi", "contextId": 3}', {}, "contextId: input should be a valid string"),
        (b'{"message": "hi", "extra": true}', {}, "extra: unknown field"),
        (b'{"message": "hi"}', {"X-Specmesh-Call-Depth": "-1"}, "x-specmesh-call-depth"),
        (b'{"message": "hi", "budgetUsd": -1}', {}, "budgetUsd: input should be greater"),
    ],
)
@pytest.mark.parametrize("path", ["/v1/invoke", "/v1/invoke/stream"])
async def test_invoke_rejects_bad_input_naming_the_field(
    http: httpx.AsyncClient, path: str, body: bytes, headers: dict[str, str], expected: str
) -> None:
    response = await http.post(
        path, content=body, headers={"content-type": "application/json", **headers}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] in ("invalid_json", "invalid_request")
    assert expected in response.json()["error"]["message"]


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"a":' * 5000], ids=["lists", "objects"])
@pytest.mark.parametrize("path", ["/v1/invoke", "/v1/invoke/stream"])
async def test_invoke_refuses_a_deeply_nested_body_with_a_400(
    http: httpx.AsyncClient, path: str, body: bytes
) -> None:
    response = await http.post(path, content=body, headers={"content-type": "application/json"})

    assert response.status_code == 400
    assert response.json() == {
        "error": {"code": "invalid_json", "message": "body: nested more than 16 deep"}
    }


@pytest.mark.parametrize("path", ["/v1/invoke", "/v1/invoke/stream"])
async def test_invoke_refuses_a_body_over_one_mib_with_a_413(
    http: httpx.AsyncClient, path: str
) -> None:
    body = b'{"message": "' + b"x" * (1 << 20) + b'"}'

    response = await http.post(path, content=body, headers={"content-type": "application/json"})

    assert response.status_code == 413
    assert response.json()["error"] == {
        "code": "too_large",
        "message": "body: must be at most 1048576 bytes",
    }


@pytest.mark.parametrize("path", ["/v1/invoke", "/v1/invoke/stream"])
async def test_invoke_is_503_when_not_ready(
    runner: ScriptedRunner, http: httpx.AsyncClient, path: str
) -> None:
    runner.set_ready(False)
    response = await http.post(path, json={"message": "hi"})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "not_ready"


async def test_a2a_turn_fails_when_not_ready(server: EngineServer, runner: ScriptedRunner) -> None:
    async with await _client(server, TransportProtocol.JSONRPC, streaming=False) as client:
        runner.set_ready(False)  # after the client read the card, which is 503 until ready
        [event] = await _collect(client.send_message(_message("hi")))
    assert event.task.status.state == TaskState.TASK_STATE_FAILED
    assert event.task.status.message.metadata["code"] == "not_ready"


# ---------------------------------------------------------------- readiness


async def test_healthz_and_readyz_follow_the_runner(
    runner: ScriptedRunner, http: httpx.AsyncClient
) -> None:
    runner.set_ready(False)
    assert (await http.get("/healthz")).status_code == 200
    assert (await http.get("/readyz")).status_code == 503

    runner.set_ready(True)
    ready = await http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "revision": 1}


async def test_grpc_health_turns_serving_when_ready() -> None:
    runner = ScriptedRunner(ready=False)
    async with (
        EngineServer(runner=runner, config=_config()) as server,
        grpc.aio.insecure_channel(server.grpc_target) as channel,
    ):
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=A2A_SERVICE), timeout=WAIT)
        first = await watch.read()
        runner.set_ready(True)
        second = await watch.read()
        watch.cancel()
        overall = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=WAIT)

    assert first.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert second.status == health_pb2.HealthCheckResponse.SERVING
    assert overall.status == health_pb2.HealthCheckResponse.SERVING


async def test_grpc_reflection_lists_the_services(server: EngineServer) -> None:
    async with grpc.aio.insecure_channel(server.grpc_target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(timeout=WAIT)
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        response = await call.read()
        await call.done_writing()

    names = {s.name for s in response.list_services_response.service}
    assert {A2A_SERVICE, "grpc.health.v1.Health"} <= names


# ---------------------------------------------------------------- metrics


async def test_turn_metrics_count_tokens_and_latency() -> None:
    reader = InMemoryMetricReader()
    metrics = EngineMetrics(
        meter=MeterProvider(metric_readers=[reader]).get_meter("test"), agent_name="scripted-agent"
    )
    runner = ScriptedRunner()
    runner.enqueue(ScriptedTurn.answer("priced", model="gpt-4o-mini"))
    async with (
        EngineServer(runner=runner, config=_config(), metrics=metrics) as server,
        httpx.AsyncClient(base_url=server.http_url, timeout=WAIT) as http,
    ):
        assert (await http.post("/v1/invoke", json={"message": "hi"})).status_code == 200
        async with await _client(server, TransportProtocol.GRPC, streaming=False) as client:
            await _collect(client.send_message(_message("hi")))

    data = reader.get_metrics_data()
    assert data is not None
    points: dict[str, list[Any]] = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                points[metric.name] = list(metric.data.data_points)
    tokens = {p.attributes["gen_ai.token.type"]: p.value for p in points["specmesh.agent.tokens"]}
    assert tokens == {"input": 14, "output": 10}
    durations = {p.attributes["transport"]: p.count for p in points["specmesh.agent.turn.duration"]}
    assert durations == {"rest": 1, "a2a": 1}
    assert {p.attributes["outcome"] for p in points["specmesh.agent.turn.duration"]} == {
        "completed"
    }
    # the priced turn's cost, from specmesh.prices (the second turn names no model)
    [cost] = points["specmesh.agent.cost"]
    assert cost.attributes["gen_ai.request.model"] == "gpt-4o-mini" and cost.value > 0


# ---------------------------------------------------------------- trace context


def _traceparent() -> tuple[str, str]:
    trace_id = uuid.uuid4().hex
    return trace_id, f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"


def _server_spans(trace_id: str) -> list[Any]:
    return [
        s
        for s in _exporter().get_finished_spans()
        if s.context is not None
        and f"{s.context.trace_id:032x}" == trace_id
        and s.kind == SpanKind.SERVER
    ]


@pytest.mark.parametrize("binding", BINDINGS)
async def test_a2a_requests_continue_the_callers_trace(server: EngineServer, binding: str) -> None:
    trace_id, traceparent = _traceparent()
    async with await _client(server, binding, streaming=False) as client:
        await _collect(
            client.send_message(_message("hi"), context=_headers(traceparent=traceparent))
        )

    await eventually(
        lambda: len(_server_spans(trace_id)) >= 2, what="the server spans", timeout=WAIT
    )
    names = {s.name for s in _server_spans(trace_id)}
    assert any(n.endswith("on_message_send") for n in names)  # a2a-sdk's span, nested
    assert names & {"POST /", "POST /v1/message:send", "lf.a2a.v1.A2AService/SendMessage"}


async def test_http_span_names_use_the_route_template(
    server: EngineServer, http: httpx.AsyncClient
) -> None:
    trace_id, traceparent = _traceparent()
    response = await http.get(
        "/v1/tasks/no-such-task", headers={"traceparent": traceparent, "A2A-Version": "1.0"}
    )
    assert response.status_code == 404
    await eventually(lambda: bool(_server_spans(trace_id)), what="the server span", timeout=WAIT)
    outer = [s for s in _server_spans(trace_id) if s.name.startswith("GET ")]
    assert [s.name for s in outer] == ["GET /v1/tasks/{id}"]


async def test_rest_requests_continue_the_callers_trace(http: httpx.AsyncClient) -> None:
    trace_id, traceparent = _traceparent()
    response = await http.post(
        "/v1/invoke", json={"message": "hi"}, headers={"traceparent": traceparent}
    )
    assert response.status_code == 200
    await eventually(lambda: bool(_server_spans(trace_id)), what="the server span", timeout=WAIT)
    [span] = _server_spans(trace_id)
    assert span.name == "POST /v1/invoke"
    assert span.attributes["http.response.status_code"] == 200


# ---------------------------------------------------------------- shutdown


async def _refused(url: str) -> bool:
    try:
        async with httpx.AsyncClient(timeout=WAIT) as fresh:
            await fresh.get(url)
    except httpx.ConnectError:
        return True
    return False


async def test_shutdown_drains_turns_in_flight() -> None:
    runner = ScriptedRunner()
    turn = runner.enqueue(ScriptedTurn.answer("finished after stop", hold_after=0))
    stop = asyncio.Event()
    started: asyncio.Future[EngineServer] = asyncio.get_running_loop().create_future()
    serving = asyncio.create_task(
        serve(runner=runner, config=_config(), stop=stop, started=started)
    )
    async with asyncio.timeout(WAIT):
        server = await started
    async with httpx.AsyncClient(base_url=server.http_url, timeout=WAIT) as http:
        invoke = asyncio.create_task(http.post("/v1/invoke", json={"message": "slow"}))
        async with asyncio.timeout(WAIT):
            await turn.held.wait()

        stop.set()
        await eventually(lambda: not server.ready, what="draining", timeout=WAIT)
        await eventually(
            lambda: _refused(f"{server.http_url}/healthz"),
            timeout=WAIT,
            what="the listener to close",
        )
        assert not invoke.done()
        turn.release.set()
        async with asyncio.timeout(WAIT):
            response = await invoke
            await serving

    assert response.status_code == 200
    assert response.json()["answer"] == "finished after stop"
    assert not turn.cancelled.is_set()
