"""What a real turn leaves behind: its ``invoke_agent`` span, the raw JSON of its answer, the
card's caching headers.

The real :class:`EngineRuntime` behind the real :class:`EngineServer`, the real litellm path
calling the scripted model server through the pass-through egress; A2A over raw HTTP (the
JSON as it is on the wire) and through the official a2a-sdk client (cancellation).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from a2a.client import ClientConfig, create_client
from a2a.types.a2a_pb2 import (
    CancelTaskRequest,
    Message,
    Part,
    Role,
    SendMessageRequest,
    TaskState,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from engine.hot_reload import EngineRuntime
from engine.intake import InMemorySnapshotFeed
from engine.server import EngineServer, ServerConfig
from engine.settings import EngineSettings
from engine.telemetry import install_memory_exporter
from localfleet.modelserver import ScriptedModelServer
from tests.integration.test_engine_runtime import AGENT, Egress, make_snapshot
from tests.polling import eventually

pytestmark = pytest.mark.integration

WAIT = 20.0
SLOW_MS = 3000
SCRIPT: dict[str, Any] = {
    "rules": [
        {
            "match": {"lastUser": "^slow"},
            "reply": {"type": "text", "text": "too late", "delayMs": SLOW_MS},
        },
        {"match": {}, "reply": {"type": "text", "text": "It is 42."}},
    ]
}
A2A_HEADERS = {"A2A-Version": "1.0"}


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    return install_memory_exporter()


@pytest.fixture(scope="module")
async def model() -> AsyncIterator[ScriptedModelServer]:
    async with ScriptedModelServer(script=SCRIPT) as server:
        yield server


@pytest.fixture(scope="module")
async def server(
    model: ScriptedModelServer, spans: InMemorySpanExporter
) -> AsyncIterator[EngineServer]:
    feed = InMemorySnapshotFeed()
    egress = Egress(model=model.root_url, mcp={}, a2a={})
    async with egress.running():
        settings = EngineSettings(agent_name=AGENT, egress_url=egress.url)
        config = ServerConfig(
            agent_name=AGENT, http_port=0, grpc_port=0, drain_timeout=5, readiness_interval=0.02
        )
        async with (
            EngineRuntime(feed=feed, settings=settings) as runtime,
            EngineServer(runner=runtime, config=config) as engine,
        ):
            await feed.publish(make_snapshot(mcp={}))
            await runtime.wait_ready(timeout=WAIT)
            yield engine


@pytest.fixture
async def http(server: EngineServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=server.http_url, headers=A2A_HEADERS, timeout=WAIT
    ) as client:
        yield client


# ---------------------------------------------------------------- helpers


def _message(text: str, context_id: str) -> dict[str, Any]:
    return {
        "message": {
            "role": "ROLE_USER",
            "messageId": uuid.uuid4().hex,
            "contextId": context_id,
            "parts": [{"text": text}],
        }
    }


def _rpc(method: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}


def _turn_spans(spans: InMemorySpanExporter, context_id: str) -> list[ReadableSpan]:
    return [
        s
        for s in spans.get_finished_spans()
        if s.name == f"invoke_agent {AGENT}"
        and (s.attributes or {}).get("gen_ai.conversation.id") == context_id
    ]


async def _turn_span(spans: InMemorySpanExporter, context_id: str) -> dict[str, Any]:
    await eventually(
        lambda: bool(_turn_spans(spans, context_id)), what="the invoke_agent span", timeout=WAIT
    )
    [span] = _turn_spans(spans, context_id)
    return dict(span.attributes or {})


def _sse_events(body: str) -> list[Any]:
    return [
        json.loads(line.removeprefix("data:"))
        for line in body.splitlines()
        if line.startswith("data:")
    ]


def _assert_answer_metadata(metadata: dict[str, Any]) -> None:
    """camelCase keys, integers as JSON integers (``json`` parses ``1.0`` as a float)."""
    assert metadata["revision"] == 1 and type(metadata["revision"]) is int
    assert metadata["promptVersion"] == "1.0"
    usage = metadata["usage"]
    assert set(usage) == {"promptTokens", "completionTokens", "totalTokens"}
    assert all(type(v) is int and v > 0 for v in usage.values()), usage
    assert usage["totalTokens"] == usage["promptTokens"] + usage["completionTokens"]


# ---------------------------------------------------------------- tests


async def test_jsonrpc_answer_metadata_is_camel_case_with_integers(
    http: httpx.AsyncClient, spans: InMemorySpanExporter
) -> None:
    context_id = f"payload-{uuid.uuid4().hex}"
    response = await http.post("/", json=_rpc("SendMessage", _message("the answer?", context_id)))

    assert response.status_code == 200, response.text
    task = json.loads(response.content)["result"]["task"]
    assert task["status"]["state"] == "TASK_STATE_COMPLETED"
    [artifact] = task["artifacts"]
    assert artifact["parts"] == [{"text": "It is 42."}]
    _assert_answer_metadata(artifact["metadata"])
    assert response.headers["content-length"] == str(len(response.content))


async def test_http_json_stream_metadata_is_camel_case_with_integers(
    http: httpx.AsyncClient,
) -> None:
    context_id = f"payload-{uuid.uuid4().hex}"
    response = await http.post("/v1/message:stream", json=_message("the answer?", context_id))

    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    updates = [e["artifactUpdate"] for e in _sse_events(response.text) if "artifactUpdate" in e]
    final = [u for u in updates if u.get("lastChunk")]
    assert len(final) == 1
    _assert_answer_metadata(final[0]["artifact"]["metadata"])


@pytest.mark.parametrize(
    ("method", "path", "streamed"),
    [
        ("SendMessage", "/", False),
        ("SendStreamingMessage", "/", True),
        (None, "/v1/message:send", False),
        (None, "/v1/message:stream", True),
        (None, "/v1/invoke", False),
        (None, "/v1/invoke/stream", True),
    ],
)
async def test_the_model_is_streamed_only_for_a_caller_that_streams(
    http: httpx.AsyncClient,
    model: ScriptedModelServer,
    method: str | None,
    path: str,
    streamed: bool,
) -> None:
    context_id = f"stream-{uuid.uuid4().hex}"
    if path.startswith("/v1/invoke"):
        body: dict[str, Any] = {"contextId": context_id, "message": "the answer?"}
    elif method is not None:
        body = _rpc(method, _message("the answer?", context_id))
    else:
        body = _message("the answer?", context_id)

    response = await http.post(path, json=body)

    assert response.status_code == 200, response.text
    assert "It is 42." in response.text
    assert model.requests()[-1].stream is streamed


@pytest.mark.parametrize("path", ["/", "/v1/message:send"])
async def test_a_caller_that_returns_immediately_has_the_model_streamed(
    http: httpx.AsyncClient, model: ScriptedModelServer, path: str
) -> None:
    """``returnImmediately``: the caller does not wait, so the answer grows in the task
    (for GetTask pollers and SubscribeToTask followers): the model is streamed."""
    question = f"the answer for {uuid.uuid4().hex}?"
    body = _message(question, f"later-{uuid.uuid4().hex}")
    body["configuration"] = {"returnImmediately": True}

    response = await http.post(path, json=_rpc("SendMessage", body) if path == "/" else body)

    assert response.status_code == 200, response.text
    assert "error" not in response.json(), response.text

    def asked() -> list[Any]:
        return [r for r in model.requests() if question in json.dumps(r.messages)]

    await eventually(lambda: bool(asked()), what="the model request of the turn", timeout=WAIT)
    assert [r.stream for r in asked()] == [True]


async def test_a_completed_turn_records_outcome_completed_without_an_error(
    http: httpx.AsyncClient, spans: InMemorySpanExporter
) -> None:
    context_id = f"done-{uuid.uuid4().hex}"
    response = await http.post("/v1/message:send", json=_message("the answer?", context_id))
    assert response.status_code == 200, response.text

    attrs = await _turn_span(spans, context_id)
    assert attrs["specmesh.turn.outcome"] == "completed"
    assert "error.type" not in attrs


async def test_a_cancelled_turn_still_records_outcome_cancelled(
    server: EngineServer, model: ScriptedModelServer, spans: InMemorySpanExporter
) -> None:
    context_id = f"cancel-{uuid.uuid4().hex}"
    before = len(model.requests())
    config = ClientConfig(streaming=True, supported_protocol_bindings=["JSONRPC"])
    async with await create_client(server.http_url, client_config=config) as client:
        request = SendMessageRequest(
            message=Message(
                role=Role.ROLE_USER,
                message_id=uuid.uuid4().hex,
                context_id=context_id,
                parts=[Part(text="slow one")],
            )
        )
        stream = client.send_message(request)
        async with asyncio.timeout(WAIT):
            first = await anext(stream)
        task_id = first.task.id if first.HasField("task") else first.status_update.task_id
        await eventually(
            lambda: len(model.requests()) > before, what="the model call", timeout=WAIT
        )
        cancelled = await client.cancel_task(CancelTaskRequest(id=task_id))
        async with asyncio.timeout(WAIT):
            _ = [event async for event in stream]

    assert cancelled.status.state == TaskState.TASK_STATE_CANCELED
    attrs = await _turn_span(spans, context_id)
    assert attrs["specmesh.turn.outcome"] == "cancelled"
    assert attrs["error.type"] == "cancelled"


async def test_agent_card_is_cacheable(http: httpx.AsyncClient) -> None:
    response = await http.get("/.well-known/agent-card.json")
    revalidated = await http.get(
        "/.well-known/agent-card.json", headers={"If-None-Match": response.headers["etag"]}
    )

    assert response.status_code == 200
    assert response.headers["cache-control"] == "public, max-age=60"
    assert revalidated.status_code == 304
    assert revalidated.headers["cache-control"] == "public, max-age=60"
