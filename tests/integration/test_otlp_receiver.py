"""The OTLP/HTTP receiver on loopback, fed by the real OpenTelemetry SDK and OTLP exporter."""

from __future__ import annotations

import asyncio
import gzip
import json
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from google.protobuf import json_format
from google.rpc import status_pb2  # type: ignore[import-untyped]
from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from control_plane.otlp import OtlpForwarder, OtlpReceiver, build_otlp_app
from control_plane.traces import InMemoryTraceStore, SqliteTraceStore
from tests.polling import eventually

pytestmark = pytest.mark.integration

DAY = datetime(2026, 3, 14, 9, 0, tzinfo=UTC)


def _ns(moment: datetime, ms: int = 0) -> int:
    return int(moment.timestamp() * 1e9) + ms * 1_000_000


class _RecordingConnection(sqlite3.Connection):
    threads: set[int] = set()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.set_trace_callback(lambda _sql: self.threads.add(threading.get_ident()))


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteTraceStore]:
    _RecordingConnection.threads = set()
    async with SqliteTraceStore(
        path=tmp_path / "traces.db", connection_factory=_RecordingConnection
    ) as s:
        yield s


@contextmanager
def _seen_encodings(app: web.Application) -> Iterator[list[str]]:
    seen: list[str] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        seen.append(request.headers.get("Content-Encoding", ""))
        response: web.StreamResponse = await handler(request)
        return response

    app.middlewares.append(record)
    yield seen


async def _serve(app: web.Application, **kwargs: Any) -> TestServer:
    server = TestServer(app, host="127.0.0.1")
    await server.start_server(**kwargs)
    return server


@pytest.fixture
async def receiver(store: SqliteTraceStore) -> AsyncIterator[tuple[TestServer, list[str]]]:
    app = build_otlp_app(OtlpReceiver(store=store))
    with _seen_encodings(app) as seen:
        server = await _serve(app)
        yield server, seen
        await server.close()


def _provider(url: str, resource: dict[str, str], **exporter: Any) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create(resource))
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=url, timeout=10, **exporter))
    )
    return provider


def _emit_two_agent_trace(planner: TracerProvider, weather: TracerProvider, day: datetime) -> str:
    """planner: invoke_agent -> chat, execute_tool -(A2A, traceparent)-> weather: SERVER ->
    invoke_agent -> chat; planner: chat. Times are explicit so the order is certain."""
    tp = planner.get_tracer("specmesh.engine")
    tw = weather.get_tracer("weather")
    usage = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o-mini"}
    root = tp.start_span(
        "invoke_agent planner",
        start_time=_ns(day),
        attributes={"gen_ai.operation.name": "invoke_agent", "gen_ai.conversation.id": "ctx-7",
                    "specmesh.prompt.version": "3", "specmesh.spec.revision": 12,
                    "gen_ai.usage.input_tokens": 300, "gen_ai.usage.output_tokens": 60},
    )  # fmt: skip
    in_root = trace.set_span_in_context(root)
    tp.start_span(
        "chat gpt-4o-mini", context=in_root, kind=SpanKind.CLIENT, start_time=_ns(day, 1),
        attributes={**usage, "gen_ai.usage.input_tokens": 100, "gen_ai.usage.output_tokens": 20},
    ).end(end_time=_ns(day, 10))  # fmt: skip
    tool = tp.start_span(
        "execute_tool weather", context=in_root, start_time=_ns(day, 20),
        attributes={"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "weather"},
    )  # fmt: skip
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(tool))
    # ---- the partner's process: continue the trace from the A2A request's headers
    server = tw.start_span(
        "POST /a2a", context=propagate.extract(carrier), kind=SpanKind.SERVER,
        start_time=_ns(day, 22),
    )  # fmt: skip
    invoke = tw.start_span(
        "invoke_agent weather", context=trace.set_span_in_context(server), start_time=_ns(day, 25),
        attributes={"gen_ai.operation.name": "invoke_agent"},
    )  # fmt: skip
    tw.start_span(
        "chat gpt-4o-mini", context=trace.set_span_in_context(invoke), kind=SpanKind.CLIENT,
        start_time=_ns(day, 30),
        attributes={**usage, "gen_ai.usage.input_tokens": 50, "gen_ai.usage.output_tokens": 10},
    ).end(end_time=_ns(day, 40))  # fmt: skip
    invoke.end(end_time=_ns(day, 50))
    server.end(end_time=_ns(day, 52))
    # ---- back in the planner
    tool.set_status(Status(StatusCode.ERROR, "partner slow"))
    tool.end(end_time=_ns(day, 60))
    tp.start_span(
        "chat gpt-4o-mini", context=in_root, kind=SpanKind.CLIENT, start_time=_ns(day, 70),
        attributes={**usage, "gen_ai.usage.input_tokens": 200, "gen_ai.usage.output_tokens": 40},
    ).end(end_time=_ns(day, 80))  # fmt: skip
    root.end(end_time=_ns(day, 100))
    return format(root.get_span_context().trace_id, "032x")


async def _export(*providers: TracerProvider) -> None:
    """Flush the SDK's batch processors (their exporter is blocking: off the loop)."""
    for provider in providers:
        assert await asyncio.to_thread(provider.force_flush, 10_000)
        await asyncio.to_thread(provider.shutdown)


def _providers(url: str, **exporter: Any) -> tuple[TracerProvider, TracerProvider]:
    return (
        _provider(url, {"service.name": "specmesh-engine", "specmesh.agent.name": "planner"},
                  **exporter),
        _provider(url, {"service.name": "weather-agent"}, **exporter),
    )  # fmt: skip


async def test_sdk_export_of_a_two_agent_trace_comes_back_as_a_waterfall(
    receiver: tuple[TestServer, list[str]], store: SqliteTraceStore
) -> None:
    server, _ = receiver
    planner, weather = _providers(str(server.make_url("/v1/traces")))

    trace_id = _emit_two_agent_trace(planner, weather, DAY)
    await _export(planner, weather)

    spans = await store.get_trace(trace_id)
    assert [(s.name, s.agent, s.service_name) for s in spans] == [
        ("invoke_agent planner", "planner", "specmesh-engine"),
        ("chat gpt-4o-mini", "planner", "specmesh-engine"),
        ("execute_tool weather", "planner", "specmesh-engine"),
        ("POST /a2a", "weather-agent", "weather-agent"),
        ("invoke_agent weather", "weather-agent", "weather-agent"),
        ("chat gpt-4o-mini", "weather-agent", "weather-agent"),
        ("chat gpt-4o-mini", "planner", "specmesh-engine"),
    ]
    by_name = {(s.name, s.agent): s for s in spans}
    root = by_name["invoke_agent planner", "planner"]
    tool = by_name["execute_tool weather", "planner"]
    assert root.parent_span_id is None
    assert by_name["POST /a2a", "weather-agent"].parent_span_id == tool.span_id
    assert by_name["chat gpt-4o-mini", "weather-agent"].parent_span_id == (
        by_name["invoke_agent weather", "weather-agent"].span_id
    )
    assert tool.status == "ERROR" and tool.status_message == "partner slow"
    assert by_name["POST /a2a", "weather-agent"].kind == "SERVER"
    assert root.attributes["specmesh.spec.revision"] == 12
    assert root.attributes["specmesh.prompt.version"] == "3"
    assert "gen_ai.input.messages" not in root.attributes  # content only if the engine sent it

    (summary,) = await store.list_traces(context_id="ctx-7")
    assert summary.trace_id == trace_id
    assert summary.root_name == "invoke_agent planner"
    assert summary.agents == ("planner", "weather-agent")
    assert (summary.span_count, summary.error, summary.total_tokens) == (7, True, 420)
    assert summary.duration_ns == 100 * 1_000_000
    assert threading.get_ident() not in _RecordingConnection.threads
    assert _RecordingConnection.threads


async def test_token_usage_is_aggregated_per_agent_model_and_day(
    receiver: tuple[TestServer, list[str]], store: SqliteTraceStore
) -> None:
    server, _ = receiver
    planner, weather = _providers(str(server.make_url("/v1/traces")))

    _emit_two_agent_trace(planner, weather, DAY - timedelta(days=1))
    _emit_two_agent_trace(planner, weather, DAY)
    await _export(planner, weather)

    rows = [
        (r.group["agent"], r.group["model"], r.group["day"], r.calls, r.input_tokens,
         r.output_tokens)
        for r in await store.token_usage()
    ]  # fmt: skip
    assert rows == [
        ("planner", "gpt-4o-mini", "2026-03-13", 2, 300, 60),
        ("planner", "gpt-4o-mini", "2026-03-14", 2, 300, 60),
        ("weather-agent", "gpt-4o-mini", "2026-03-13", 1, 50, 10),
        ("weather-agent", "gpt-4o-mini", "2026-03-14", 1, 50, 10),
    ]
    (today,) = await store.token_usage(group_by=["day"], since=DAY)
    assert (today.input_tokens, today.output_tokens) == (350, 70)
    assert today.cost_usd > 0  # gpt-4o-mini is in litellm's price map


async def test_gzip_from_the_sdk_exporter_is_accepted(
    receiver: tuple[TestServer, list[str]], store: SqliteTraceStore
) -> None:
    server, seen = receiver
    planner, weather = _providers(str(server.make_url("/v1/traces")), compression=Compression.Gzip)

    trace_id = _emit_two_agent_trace(planner, weather, DAY)
    await _export(planner, weather)

    assert seen and set(seen) == {"gzip"}
    assert len(await store.get_trace(trace_id)) == 7


async def _post(
    server: TestServer, body: bytes, content_type: str, **headers: str
) -> tuple[int, str, bytes]:
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.post(
            server.make_url("/v1/traces"),
            data=body,
            headers={"Content-Type": content_type, **headers},
        ) as response,
    ):
        return response.status, response.content_type, await response.read()


def _otlp_json(**span_overrides: Any) -> dict[str, Any]:
    """An export in the OTLP JSON encoding: hex ids, camelCase, int64 as strings, enums as ints."""
    span = {
        "traceId": "5b8efff798038103d269b633813fc60c",
        "spanId": "eee19b7ec3c1b174",
        "parentSpanId": "",
        "name": "chat gpt-4o-mini",
        "kind": 3,
        "startTimeUnixNano": str(_ns(DAY)),
        "endTimeUnixNano": str(_ns(DAY, 12)),
        "attributes": [
            {"key": "gen_ai.operation.name", "value": {"stringValue": "chat"}},
            {"key": "gen_ai.usage.input_tokens", "value": {"intValue": "12"}},
            {"key": "gen_ai.request.temperature", "value": {"doubleValue": 0.2}},
            {"key": "gen_ai.response.finish_reasons",
             "value": {"arrayValue": {"values": [{"stringValue": "stop"}]}}},
        ],
        "events": [{"timeUnixNano": str(_ns(DAY, 5)), "name": "first_token"}],
        "status": {"code": 1},
        "someFutureField": True,  # receivers must ignore unknown fields
        **span_overrides,
    }  # fmt: skip
    return {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [
                        {"key": "service.name", "value": {"stringValue": "specmesh-engine"}},
                        {"key": "specmesh.agent.name", "value": {"stringValue": "json-agent"}},
                    ]
                },
                "scopeSpans": [{"scope": {"name": "manual"}, "spans": [span]}],
            }
        ]
    }


async def test_json_body_is_accepted(
    receiver: tuple[TestServer, list[str]], store: SqliteTraceStore
) -> None:
    server, _ = receiver

    status, content_type, body = await _post(
        server, json.dumps(_otlp_json()).encode(), "application/json"
    )

    assert (status, content_type) == (200, "application/json")
    json_format.Parse(body, ExportTraceServiceResponse())
    (span,) = await store.get_trace("5b8efff798038103d269b633813fc60c")
    assert (span.span_id, span.parent_span_id, span.kind, span.status) == (
        "eee19b7ec3c1b174", None, "CLIENT", "OK")  # fmt: skip
    assert span.agent == "json-agent"
    assert span.attributes == {
        "gen_ai.operation.name": "chat",
        "gen_ai.usage.input_tokens": 12,
        "gen_ai.request.temperature": 0.2,
        "gen_ai.response.finish_reasons": ["stop"],
    }
    assert [(e.name, e.time_ns) for e in span.events] == [("first_token", _ns(DAY, 5))]


async def test_gzip_is_inflated_by_the_receiver_when_the_server_does_not(
    store: SqliteTraceStore,
) -> None:
    server = await _serve(build_otlp_app(OtlpReceiver(store=store)), auto_decompress=False)
    try:
        body = gzip.compress(json.dumps(_otlp_json()).encode())

        status, _, _ = await _post(server, body, "application/json", **{"Content-Encoding": "gzip"})
        bad = await _post(server, body[:-12], "application/json", **{"Content-Encoding": "gzip"})
    finally:
        await server.close()

    assert status == 200
    assert len(await store.get_trace("5b8efff798038103d269b633813fc60c")) == 1
    assert bad[0] == 400 and b"truncated gzip" in bad[2]


async def test_garbage_is_answered_400_with_a_clear_message(
    receiver: tuple[TestServer, list[str]], store: SqliteTraceStore
) -> None:
    server, _ = receiver

    proto = await _post(server, b"\xff\xfe garbage \x00\x01", "application/x-protobuf")
    not_json = await _post(server, b"{nope", "application/json")
    bad_id = await _post(
        server, json.dumps(_otlp_json(traceId="not-hex")).encode(), "application/json"
    )
    bad_gzip = await _post(
        server, b"\x1f\x8b not gzip", "application/x-protobuf", **{"Content-Encoding": "gzip"}
    )
    wrong_type = await _post(server, b"hello", "text/plain")

    assert proto[:2] == (400, "application/x-protobuf")
    message = status_pb2.Status.FromString(proto[2]).message
    assert message.startswith("body: not an OTLP ExportTraceServiceRequest")
    assert not_json[0] == 400
    assert json.loads(not_json[2])["message"].startswith("body: invalid JSON")
    assert bad_id[0] == 400
    assert (
        "resourceSpans[0].scopeSpans[0].spans[0].traceId: must be a hex string"
        in (json.loads(bad_id[2])["message"])
    )
    assert bad_gzip[0] == 400
    assert status_pb2.Status.FromString(bad_gzip[2]).message == (
        "body: cannot be read (Can not decode content-encoding: gzip)"
    )
    assert wrong_type[0] == 415
    assert "application/x-protobuf" in json.loads(wrong_type[2])["message"]
    assert await store.list_traces() == []


async def test_spans_with_malformed_ids_are_rejected_as_a_partial_success(
    receiver: tuple[TestServer, list[str]], store: SqliteTraceStore
) -> None:
    server, _ = receiver
    request = json_format.ParseDict(
        {"resourceSpans": [{"scopeSpans": [{"spans": [
            {"traceId": "W47/95gDgQPSabYzgT/GDA==", "spanId": "7uGbfsPBsXQ=", "name": "ok"},
            {"traceId": "AAAAAAAAAAAAAAAAAAAAAA==", "spanId": "7uGbfsPBsXQ=", "name": "zero"},
        ]}]}]},
        ExportTraceServiceRequest(),
    )  # fmt: skip

    status, _, body = await _post(server, request.SerializeToString(), "application/x-protobuf")

    response = ExportTraceServiceResponse.FromString(body)
    assert status == 200
    assert response.partial_success.rejected_spans == 1
    assert "trace id must be 16 bytes" in response.partial_success.error_message
    assert [t.root_name for t in await store.list_traces()] == ["ok"]


async def test_a_token_when_configured_is_required(store: SqliteTraceStore) -> None:
    server = await _serve(build_otlp_app(OtlpReceiver(store=store, token="t0k")))
    try:
        body = json.dumps(_otlp_json()).encode()
        without = await _post(server, body, "application/json")
        with_token = await _post(server, body, "application/json", Authorization="Bearer t0k")
    finally:
        await server.close()

    assert (without[0], with_token[0]) == (401, 200)


class _FailingStore(InMemoryTraceStore):
    async def add_spans(self, spans: Any) -> None:
        raise sqlite3.OperationalError("disk I/O error")


async def test_a_failing_store_is_answered_503_so_exporters_retry() -> None:
    server = await _serve(build_otlp_app(OtlpReceiver(store=_FailingStore())))
    try:
        status, _, body = await _post(server, json.dumps(_otlp_json()).encode(), "application/json")
    finally:
        await server.close()

    assert status == 503
    assert json.loads(body)["message"] == "the trace store is unavailable"


async def test_accepted_exports_are_forwarded_to_a_collector(store: SqliteTraceStore) -> None:
    collector_store = InMemoryTraceStore()
    collector = await _serve(build_otlp_app(OtlpReceiver(store=collector_store)))
    try:
        async with OtlpForwarder(url=str(collector.make_url("/v1/traces"))) as forwarder:
            server = await _serve(build_otlp_app(OtlpReceiver(store=store, forwarder=forwarder)))
            try:
                planner, weather = _providers(
                    str(server.make_url("/v1/traces")), compression=Compression.Gzip
                )
                trace_id = _emit_two_agent_trace(planner, weather, DAY)
                await _export(planner, weather)

                async def arrived() -> bool:
                    return len(await collector_store.get_trace(trace_id)) == 7

                await eventually(arrived, timeout=10.0, what="the exported spans")
            finally:
                await server.close()
    finally:
        await collector.close()

    assert len(await store.get_trace(trace_id)) == 7
    assert (forwarder.failed, forwarder.dropped) == (0, 0)


async def test_a_failing_or_slow_collector_never_blocks_ingestion(store: SqliteTraceStore) -> None:
    release = asyncio.Event()
    arrived = asyncio.Event()

    async def stuck(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        return web.Response(status=500)

    app = web.Application()
    app.router.add_post("/v1/traces", stuck)
    collector = await _serve(app)
    body = json.dumps(_otlp_json()).encode()
    try:
        async with OtlpForwarder(
            url=str(collector.make_url("/v1/traces")), queue_size=1, drain_timeout=5
        ) as forwarder:
            server = await _serve(build_otlp_app(OtlpReceiver(store=store, forwarder=forwarder)))
            try:
                first = await _post(server, body, "application/json")  # in flight, stuck
                await asyncio.wait_for(arrived.wait(), timeout=10)
                statuses = [(await _post(server, body, "application/json"))[0] for _ in range(3)]
            finally:
                await server.close()
            dropped = forwarder.dropped
            release.set()
    finally:
        await collector.close()

    assert first[0] == 200 and statuses == [200, 200, 200]  # one queued, two dropped
    assert dropped == 2
    assert forwarder.failed == 2  # the stuck one and the queued one, both answered 500
    assert len(await store.get_trace("5b8efff798038103d269b633813fc60c")) == 1
