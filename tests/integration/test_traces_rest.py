"""Trace queries over REST (wiring check): roles, waterfall, summaries, token usage."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from control_plane.api import ControlPlane
from control_plane.auth import Principal, Role, StaticTokenAuthenticator, hash_token
from control_plane.grpc_api import build_servicers
from control_plane.http_api import build_app
from control_plane.otlp import OtlpReceiver, build_otlp_app
from control_plane.traces import InMemoryTraceStore
from specmesh.store import SpecStore
from specmesh.vault import VaultClient

pytestmark = pytest.mark.integration
TRACE = "5b8efff798038103d269b633813fc60c"


@pytest.fixture
async def servers(
    store: SpecStore, vault: VaultClient
) -> AsyncIterator[tuple[TestServer, TestServer]]:
    traces = InMemoryTraceStore()
    auth = StaticTokenAuthenticator(
        {
            hash_token("v"): Principal("viewer", frozenset({Role.VIEWER})),
            hash_token("s"): Principal("secrets", frozenset({Role.SECRETS_ADMIN})),
        }
    )
    cp = ControlPlane(store=store, vault=vault, traces=traces)
    api = TestServer(build_app(cp, auth, build_servicers(cp, auth)))
    otlp = TestServer(build_otlp_app(OtlpReceiver(store=traces)))
    await api.start_server()
    await otlp.start_server()
    yield api, otlp
    await api.close()
    await otlp.close()


async def _get(server: TestServer, path: str, token: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(server.make_url(path), headers={"Authorization": f"Bearer {token}"}) as r,
    ):
        return r.status, await r.json()


async def test_traces_over_rest(servers: tuple[TestServer, TestServer]) -> None:
    api, otlp = servers
    doc = {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [{"key": "specmesh.agent.name", "value": {"stringValue": "a"}}]
                },
                "scopeSpans": [
                    {
                        "spans": [
                            {
                                "traceId": TRACE,
                                "spanId": "eee19b7ec3c1b174",
                                "name": "invoke_agent a",
                                "startTimeUnixNano": "1773489600000000000",
                                "endTimeUnixNano": "1773489600100000000",
                                "attributes": [
                                    {
                                        "key": "gen_ai.operation.name",
                                        "value": {"stringValue": "invoke_agent"},
                                    },
                                    {
                                        "key": "gen_ai.conversation.id",
                                        "value": {"stringValue": "c1"},
                                    },
                                ],
                            },
                            {
                                "traceId": TRACE,
                                "spanId": "eee19b7ec3c1b175",
                                "parentSpanId": "eee19b7ec3c1b174",
                                "name": "chat gpt-4o-mini",
                                "startTimeUnixNano": "1773489600010000000",
                                "endTimeUnixNano": "1773489600020000000",
                                "attributes": [
                                    {
                                        "key": "gen_ai.operation.name",
                                        "value": {"stringValue": "chat"},
                                    },
                                    {
                                        "key": "gen_ai.request.model",
                                        "value": {"stringValue": "gpt-4o-mini"},
                                    },
                                    {
                                        "key": "gen_ai.usage.input_tokens",
                                        "value": {"intValue": "1000"},
                                    },
                                    {
                                        "key": "gen_ai.usage.output_tokens",
                                        "value": {"intValue": "100"},
                                    },
                                ],
                            },
                        ]
                    }
                ],
            }
        ]
    }
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            otlp.make_url("/v1/traces"),
            data=json.dumps(doc),
            headers={"Content-Type": "application/json"},
        ) as r,
    ):
        assert r.status == 200

    status, body = await _get(api, "/api/v1/traces?contextId=c1&since=2026-03-14T00:00:00Z", "v")
    traces = body["traces"]
    assert (
        status == 200
        and [t["traceId"] for t in traces] == [TRACE]
        and traces[0]["totalTokens"] == "1100"  # int64: a string in proto3 JSON
    )
    status, body = await _get(api, f"/api/v1/traces/{TRACE}", "v")
    spans = body["spans"]
    assert status == 200 and [s["parentSpanId"] for s in spans] == ["", "eee19b7ec3c1b174"]
    status, body = await _get(api, "/api/v1/token-usage?groupBy=agent&groupBy=model", "v")
    usage = body["rows"]
    assert status == 200 and usage[0]["agent"] == "a" and usage[0]["costUsd"] > 0, usage
    assert (await _get(api, "/api/v1/token-usage?groupBy=tenant", "v"))[0] == 400
    assert (await _get(api, "/api/v1/traces?since=yesterday", "v"))[0] == 400
    assert (await _get(api, "/api/v1/traces/" + "0" * 32, "v"))[0] == 404
    assert (await _get(api, "/api/v1/traces/xyz", "v"))[0] == 400
    assert (await _get(api, "/api/v1/traces", "s"))[0] == 403  # secrets-admin has no traces.read
