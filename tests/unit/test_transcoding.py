"""The REST transcoder (control_plane/transcoding.py) over the real descriptors, with an
in-memory servicer that records the request it is given: path, query and body mapping, and
the 400s that name the field and where it was."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from google.protobuf import json_format, message_factory
from google.protobuf.message import Message

from control_plane.auth import Principal, Role, StaticTokenAuthenticator, hash_token
from control_plane.errors import NotFoundError
from control_plane.transcoding import add_transcoded_routes, http_bindings
from specmesh.v1 import control_plane_pb2 as pb

AUTH = {"Authorization": "Bearer tok"}


class RecordingServicer:
    """Answers every RPC with its empty response and keeps what it was asked."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self.calls: list[tuple[str, Principal, Message]] = []

    async def invoke(self, method: str, principal: Principal, request: Message) -> Message:
        self.calls.append((method, principal, request))
        if getattr(request, "agent_name", "") == "ghost":
            raise NotFoundError(kind="agent", name="ghost")
        output = self.service.methods_by_name[method].output_type
        response: Message = message_factory.GetMessageClass(output)()
        return response


@pytest.fixture
async def client() -> AsyncIterator[tuple[TestClient[Any, Any], dict[str, RecordingServicer]]]:
    services = list(pb.DESCRIPTOR.services_by_name.values())
    servicers = {s.full_name: RecordingServicer(s) for s in services}
    auth = StaticTokenAuthenticator({hash_token("tok"): Principal("me", frozenset({Role.ADMIN}))})
    app = web.Application()
    add_transcoded_routes(app, http_bindings(services), servicers, auth)
    async with TestClient(TestServer(app)) as c:
        yield c, servicers


def _last(servicers: dict[str, RecordingServicer], service: str) -> tuple[str, Message]:
    method, principal, request = servicers[f"specmesh.v1.{service}"].calls[-1]
    assert principal.name == "me"
    return method, request


async def test_path_and_body_star_make_one_request(client: Any) -> None:
    c, servicers = client
    r = await c.post(
        "/api/v1/agents/helper/scale", json={"replicas": 3, "track": "canary"}, headers=AUTH
    )
    assert r.status == 200, await r.text()
    method, request = _last(servicers, "AgentService")
    assert method == "ScaleAgent"
    assert (request.agent_name, request.replicas, request.track) == ("helper", 3, "canary")
    assert request.HasField("replicas") and not request.HasField("expected_revision")
    assert await r.json() == {"changes": [], "createdRevision": False, "warnings": []}


async def test_a_body_field_and_the_query_string(client: Any) -> None:
    c, servicers = client
    r = await c.put(
        "/api/v1/agents/helper/release?dryRun=true&message=why",
        json={"canaryWeight": 10},
        headers=AUTH,
    )
    assert r.status == 200, await r.text()
    _, request = _last(servicers, "ReleaseService")
    assert json_format.MessageToDict(request) == {
        "agentName": "helper", "release": {"canaryWeight": 10.0}, "dryRun": True, "message": "why",
    }  # fmt: skip


async def test_repeated_and_well_known_types_from_the_query(client: Any) -> None:
    c, servicers = client
    r = await c.get(
        "/api/v1/token-usage?groupBy=agent&group_by=day&since=2026-03-14T00:00:00Z",
        headers=AUTH,
    )
    assert r.status == 200, await r.text()
    _, request = _last(servicers, "TraceService")
    assert list(request.group_by) in (["agent", "day"], ["day", "agent"])
    assert request.since.ToJsonString() == "2026-03-14T00:00:00Z"


@pytest.mark.parametrize(
    ("method", "url", "body", "message"),
    [
        ("GET", "/api/v1/agents/a?revision=x", None, "query: Failed to parse revision field"),
        ("GET", "/api/v1/agents/a?nope=1", None, "query: unknown parameter 'nope'"),
        ("GET", "/api/v1/agents/a?revision=1&revision=2", None, "query: revision: given more"),
        ("PUT", "/api/v1/agents/a/release?dryRun=yes", {}, "query: dryRun: must be true or"),
        ("POST", "/api/v1/agents/a/scale", {"replicas": "many"}, "body: Failed to parse replicas"),
        ("POST", "/api/v1/agents/a/scale", {"agentName": "b"}, "body: agentName: set by the path"),
        ("POST", "/api/v1/agents/a/scale", [1], "body: must be a JSON object"),
        ("POST", "/api/v1/agents/a/scale", {"x": 1}, 'body: Message type "specmesh.v1.Scale'),
        ("GET", "/api/v1/agents/a", {"x": 1}, "body: GET /api/v1/agents/{agent_name} takes no"),
    ],
)
async def test_bad_input_is_a_400_naming_the_field_and_where(
    client: Any, method: str, url: str, body: Any, message: str
) -> None:
    c, _ = client
    r = await c.request(method, url, json=body, headers=AUTH)
    answer = await r.json()
    assert (r.status, answer["error"]["code"]) == (400, "bad_request"), answer
    assert answer["error"]["message"].startswith(message), answer


async def test_errors_take_the_table_row_and_no_token_is_401_before_parsing(client: Any) -> None:
    c, _ = client
    r = await c.get("/api/v1/agents/ghost", headers=AUTH)
    assert (r.status, (await r.json())["error"]["code"]) == (404, "not_found")
    r = await c.get("/api/v1/agents/a?revision=x")
    assert (r.status, (await r.json())["error"]["code"]) == (401, "unauthenticated")
