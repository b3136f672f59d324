"""The CLI's gRPC boundary (:mod:`specmeshctl.client`): every status a control plane can
answer becomes a :class:`ControlPlaneError` with a clear message and its exit code. The
server here is a real grpc.aio server on a loopback port that answers each call with the
status under test, as the control plane's ``_Service._run`` does (details, and the
``specmesh-error-reason`` trailer)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any

import grpc
import pytest

from specmesh.v1 import control_plane_pb2 as pb
from specmeshctl.client import ControlPlaneClient
from specmeshctl.errors import ControlPlaneError, UsageError

from ..certs import self_signed

_EXPECTED_EXIT: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 1,
    grpc.StatusCode.FAILED_PRECONDITION: 1,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 1,
    grpc.StatusCode.OUT_OF_RANGE: 1,
    grpc.StatusCode.ABORTED: 3,
    grpc.StatusCode.ALREADY_EXISTS: 3,
    grpc.StatusCode.NOT_FOUND: 4,
    grpc.StatusCode.UNAVAILABLE: 5,
    grpc.StatusCode.DEADLINE_EXCEEDED: 5,
    grpc.StatusCode.UNAUTHENTICATED: 7,
    grpc.StatusCode.PERMISSION_DENIED: 7,
    grpc.StatusCode.CANCELLED: 6,
    grpc.StatusCode.UNKNOWN: 6,
    grpc.StatusCode.UNIMPLEMENTED: 6,
    grpc.StatusCode.INTERNAL: 6,
    grpc.StatusCode.DATA_LOSS: 6,
}


def test_every_grpc_status_has_an_exit_code() -> None:
    errors = [s for s in grpc.StatusCode if s != grpc.StatusCode.OK]

    assert sorted(s.name for s in errors) == sorted(s.name for s in _EXPECTED_EXIT)


async def _serve(
    answer: Callable[[Any, grpc.aio.ServicerContext], Any],
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.aio.Server, str]:
    async def list_agents(request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await answer(request, context)

    handler = grpc.method_handlers_generic_handler(
        "specmesh.v1.AgentService",
        {
            "ListAgents": grpc.unary_unary_rpc_method_handler(
                list_agents,
                request_deserializer=pb.ListAgentsRequest.FromString,
                response_serializer=pb.ListAgentsResponse.SerializeToString,
            )
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    return server, f"127.0.0.1:{port}"


async def _call(answer: Callable[[Any, grpc.aio.ServicerContext], Any], token: str | None) -> Any:
    server, address = await _serve(answer)
    try:
        async with aclosing(ControlPlaneClient(server=address, token=token, timeout=10)) as cp:
            return await cp.call(cp.agents.ListAgents, pb.ListAgentsRequest())
    finally:
        await server.stop(None)


@pytest.mark.parametrize("code", list(_EXPECTED_EXIT))
def test_every_status_maps_to_its_exit_code_with_the_servers_message(
    code: grpc.StatusCode,
) -> None:
    async def answer(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, f"the {code.name} details", (("specmesh-error-reason", "why"),))

    with pytest.raises(ControlPlaneError) as caught:
        asyncio.run(_call(answer, "t"))

    error = caught.value
    assert (error.code, error.exit_code, error.reason) == (code, _EXPECTED_EXIT[code], "why")
    assert f"the {code.name} details" in str(error)


def test_an_invalid_spec_prints_every_issue_on_its_own_line() -> None:
    async def answer(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            "2 problems in spec:\nspec.model.temperature: must be <= 2 (got 7)\nspec.x: unknown",
            (("specmesh-error-reason", "invalid_spec"),),
        )

    with pytest.raises(ControlPlaneError) as caught:
        asyncio.run(_call(answer, "t"))

    lines = str(caught.value).splitlines()
    assert lines[0].endswith("2 problems in spec: (INVALID_ARGUMENT, invalid_spec)")
    assert lines[1:] == ["  spec.model.temperature: must be <= 2 (got 7)", "  spec.x: unknown"]


def test_the_token_travels_as_authorization_metadata() -> None:
    seen: list[str | None] = []

    async def answer(request: Any, context: grpc.aio.ServicerContext) -> Any:
        metadata = dict(context.invocation_metadata() or ())
        seen.append(metadata.get("authorization"))
        return pb.ListAgentsResponse()

    asyncio.run(_call(answer, "tok-1"))
    asyncio.run(_call(answer, None))

    assert seen == ["Bearer tok-1", None]


def test_a_server_nobody_listens_on_is_unavailable_exit_5() -> None:
    async def call() -> None:
        async with aclosing(ControlPlaneClient(server="127.0.0.1:1", token=None, timeout=10)) as cp:
            await cp.call(cp.agents.ListAgents, pb.ListAgentsRequest())

    with pytest.raises(ControlPlaneError) as caught:
        asyncio.run(call())

    assert caught.value.exit_code == 5
    assert "control plane at 127.0.0.1:1 is unavailable" in str(caught.value)


@pytest.mark.parametrize("server", ["http://127.0.0.1:8090", "localhost", "grpcs://host"])
def test_a_server_that_is_not_host_port_is_a_usage_error(server: str) -> None:
    with pytest.raises(UsageError, match="expected the control plane's gRPC address"):
        ControlPlaneClient(server=server, token=None)


def test_grpcs_talks_tls_and_trusts_the_ca_file(tmp_path: Path) -> None:
    key_pem, cert_pem = self_signed("localhost", dns_names=("localhost",))
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(cert_pem)

    async def answer(request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ListAgentsResponse(next_page_token="")

    async def call(ca: Path | None) -> Any:
        credentials = grpc.ssl_server_credentials([(key_pem, cert_pem)])
        server, address = await _serve(answer, credentials)
        port = address.rpartition(":")[2]
        try:
            client = ControlPlaneClient(
                server=f"grpcs://localhost:{port}", token="t", ca_file=ca, timeout=10
            )
            async with aclosing(client) as cp:
                return await cp.call(cp.agents.ListAgents, pb.ListAgentsRequest())
        finally:
            await server.stop(None)

    assert asyncio.run(call(ca_file)) == pb.ListAgentsResponse()
    with pytest.raises(ControlPlaneError) as caught:  # the system's roots do not trust it
        asyncio.run(call(None))
    assert caught.value.exit_code == 5
