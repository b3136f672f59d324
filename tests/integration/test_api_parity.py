"""REST and gRPC are one API: a walk over the proto's descriptors checks that every RPC of the
control plane has its REST route, its OpenAPI operation, and the same answer on both
transports -- over real gRPC and real HTTP, on one ControlPlane with real etcd and OpenBao --
for a call without a token and for a call naming something that does not exist."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp.test_utils import TestServer
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor

from control_plane.api import ControlPlane
from control_plane.auth import Principal, Role, StaticTokenAuthenticator, hash_token
from control_plane.errors import ERROR_TABLE, INTERNAL, ErrorMapping
from control_plane.grpc_api import build_grpc_server, build_servicers
from control_plane.http_api import OPENAPI_PATH, build_app
from control_plane.transcoding import HttpBinding, http_bindings
from specmesh.ports import free_port
from specmesh.store import SpecStore
from specmesh.v1 import control_plane_pb2
from specmesh.vault import VaultClient

pytestmark = pytest.mark.integration

TOKEN = "tok-parity-all-roles"
SERVICES = list(control_plane_pb2.DESCRIPTOR.services_by_name.values())
METHODS = [m for s in SERVICES for m in s.methods]
BINDINGS = {b.method.full_name: b for b in http_bindings(SERVICES) if not b.additional}
MISSING = {"trace_id": "0" * 32, "token_id": "0" * 12}
"""Path values naming nothing, where a field has a format; others get ``missing-<field>``."""
NOT_FOUND = {
    *("GetAgent", "DeleteAgent", "ListAgentRevisions", "GetAgentStatus"),
    *("GetPrompt", "SetPromptRelease", "GetPromptHistory", "GetMcpServer", "ListMcpServerTools"),
    *("GetAgentCard", "IssueInvokeToken", "SetRelease", "GetRelease", "PreviewRelease"),
    *("GetTrace", "RevokeToken"),
}
"""The RPCs whose request, with only its path fields set, names nothing that exists."""


@dataclass
class Api:
    http: TestServer
    channel: grpc.aio.Channel


@pytest.fixture
async def api(store: SpecStore, vault: VaultClient) -> AsyncIterator[Api]:
    authenticator = StaticTokenAuthenticator(
        {hash_token(TOKEN): Principal("parity", frozenset(Role))}
    )
    cp = ControlPlane(store=store, vault=vault)
    address = f"127.0.0.1:{free_port()}"
    grpc_server = await build_grpc_server(cp, authenticator, address)
    await grpc_server.start()
    http = TestServer(build_app(cp, authenticator, build_servicers(cp, authenticator)))
    await http.start_server()
    async with grpc.aio.insecure_channel(address) as channel:
        yield Api(http, channel)
    await http.close()
    await grpc_server.stop(None)


def _request(method: MethodDescriptor) -> Any:
    """The method's request with every path field naming nothing that exists."""
    request = message_factory.GetMessageClass(method.input_type)()
    for path in BINDINGS[method.full_name].path_fields:
        target = request
        *parents, name = path.split(".")
        for parent in parents:
            target = getattr(target, parent)
        setattr(target, name, MISSING.get(name, f"missing-{name.replace('_', '-')}"))
    return request


async def _grpc(api: Api, method: MethodDescriptor, token: str | None) -> tuple[str, str]:
    """(gRPC status name, reason) of calling ``method`` over gRPC."""
    call = api.channel.unary_unary(
        f"/{method.containing_service.full_name}/{method.name}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=message_factory.GetMessageClass(method.output_type).FromString,
    )
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    try:
        await call(_request(method), metadata=metadata, timeout=20)
    except grpc.aio.AioRpcError as e:
        reason = dict(e.trailing_metadata() or ()).get("specmesh-error-reason", "")
        return e.code().name, str(reason)
    return "OK", ""


def _url(binding: HttpBinding, request: Any) -> str:
    path = binding.openapi_path
    for field in binding.path_fields:
        value: Any = request
        for part in field.split("."):
            value = getattr(value, part)
        path = path.replace(f"{{{field}}}", str(value))
    return path


async def _http(api: Api, method: MethodDescriptor, token: str | None) -> tuple[int, str]:
    """(HTTP status, error code) of calling ``method`` over REST."""
    binding = BINDINGS[method.full_name]
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {} if binding.body else None
    url = str(api.http.make_url(_url(binding, _request(method))))
    async with (
        aiohttp.ClientSession() as session,
        session.request(binding.verb, url, json=body, headers=headers) as response,
    ):
        data = await response.json()
        code = data["error"]["code"] if response.status >= 400 else ""
        return response.status, code


def _row(grpc_code: str, reason: str) -> ErrorMapping:
    return next(
        m
        for m in (*ERROR_TABLE, INTERNAL)
        if m.grpc_status.name == grpc_code and m.reason == reason
    )


async def test_every_rpc_has_a_route_and_an_openapi_operation(api: Api) -> None:
    routes = {
        (r.method, r.resource.canonical)
        for r in api.http.app.router.routes()
        if r.resource is not None
    }
    async with (
        aiohttp.ClientSession() as session,
        session.get(str(api.http.make_url(OPENAPI_PATH))) as response,
    ):
        document = await response.json()
    operations = {
        op["operationId"]: (verb.upper(), path)
        for path, item in document["paths"].items()
        for verb, op in item.items()
    }
    assert len(METHODS) > 40
    for method in METHODS:
        binding = BINDINGS.get(method.full_name)
        assert binding is not None, f"{method.full_name}: no google.api.http rule"
        route = re.sub(r"\{(\w+):[^}]*\}", r"{\1}", binding.route)  # as aiohttp shows it
        assert (binding.verb, route) in routes, method.full_name
        assert operations[method.name] == (binding.verb, binding.openapi_path), method.name


async def test_a_call_without_a_token_is_refused_alike_on_both(api: Api) -> None:
    for method in METHODS:
        assert await _grpc(api, method, None) == ("UNAUTHENTICATED", "unauthenticated"), method.name
        assert await _http(api, method, None) == (401, "unauthenticated"), method.name


async def test_a_call_naming_what_does_not_exist_gets_the_same_table_row_on_both(
    api: Api,
) -> None:
    answers: dict[str, tuple[int, str, str]] = {}
    for method in METHODS:
        code, reason = await _grpc(api, method, TOKEN)
        status, http_reason = await _http(api, method, TOKEN)
        if code == "OK":
            assert status == 200, f"{method.name}: OK over gRPC, {status} over REST"
            continue
        row = _row(code, reason)
        assert (status, http_reason) == (row.http_status, row.reason), method.name
        assert row is not INTERNAL, f"{method.name}: an internal error"
        answers[method.name] = (status, code, reason)
    # what names a missing agent, prompt, MCP server, trace or token (and needs nothing else)
    # is NOT_FOUND on both; the rest of the answers are a missing field's INVALID_ARGUMENT
    assert {name for name, answer in answers.items() if answer[0] == 404} == NOT_FOUND, answers
    assert {answer[0] for answer in answers.values()} == {400, 404}, answers
