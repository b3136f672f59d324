"""A2A over gRPC through two sidecars, with mTLS certificates from real OpenBao PKI:
official a2a-sdk client (GRPC binding) -> sidecar A's GrpcEgress -> sidecar B's GrpcInbound
-> engine B (EngineServer + ScriptedRunner)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import pytest
from a2a.client import ClientConfig, create_client
from a2a.types.a2a_pb2 import (
    GetTaskRequest,
    Message,
    Part,
    Role,
    SendMessageRequest,
    StreamResponse,
    SubscribeToTaskRequest,
    TaskState,
)
from a2a.utils.constants import TransportProtocol
from a2a.utils.errors import TaskNotFoundError
from google.rpc import error_details_pb2, status_pb2
from prometheus_client import CollectorRegistry

from engine.server import EngineServer, ServerConfig
from engine.testing import ScriptedRunner, ScriptedTurn
from sidecar.credentials import CredentialResolver
from sidecar.egress import EgressProxy
from sidecar.engine_calls import EngineCalls
from sidecar.errors import POLICY_ERRORS
from sidecar.grpcproxy import (
    A2A_SERVICE,
    CALLER_KEY,
    TARGET_KEY,
    GrpcEgress,
    GrpcInbound,
    GrpcInstanceSource,
)
from sidecar.inbound import InMemoryPartnerGraph
from sidecar.ledger import BudgetLedger
from sidecar.mtls import AgentCertificates, PkiClient, agent_dns_name
from sidecar.registry import Instance
from sidecar.router import InMemoryInstanceSource, InMemoryReleaseSource, Router
from sidecar.state import SnapshotHolder
from specmesh.budget import BUDGET_HEADER, BUDGET_TOTAL_HEADER, LEDGER_HEADER
from specmesh.ports import free_port
from specmesh.secrets import VaultRef
from specmesh.vault import VaultClient
from tests.integration.test_sidecar_egress import _ref, _snapshot, _spec
from tests.integration.test_sidecar_mtls import pki  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration

CALLER = "agent-a"
CALLEE = "agent-b"
WAIT = 20.0


def _with_target(details: Any, agent: str) -> Any:
    metadata = grpc.aio.Metadata(*(details.metadata or ()), (TARGET_KEY, agent))
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _TargetUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Adds ``x-specmesh-target-agent`` (what the engine does toward its egress). grpc.aio
    files an interceptor under one kind only, hence one class per kind."""

    def __init__(self, agent: str) -> None:
        self.agent = agent

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_target(details, self.agent), request)


class _TargetStream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, agent: str) -> None:
        self.agent = agent

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_target(details, self.agent), request)


@dataclass
class Rig:
    runner: ScriptedRunner
    engine: EngineServer
    inbound: GrpcInbound
    egress: GrpcEgress
    pki: PkiClient
    router: Router
    ca_pem: str
    b_certs: AgentCertificates
    metrics: CollectorRegistry


@pytest.fixture
async def rig(pki: PkiClient, vault: VaultClient) -> AsyncIterator[Rig]:  # noqa: F811
    await vault.write(VaultRef.parse(_ref(CALLER, "partner-token")), "tok-from-vault")
    runner = ScriptedRunner()
    config = ServerConfig(agent_name=CALLEE, http_port=0, grpc_port=0, drain_timeout=2.0)
    graph = InMemoryPartnerGraph({CALLER: [CALLEE], "stranger": ["someone-else"]})
    spec = _spec(
        CALLER,
        "http://127.0.0.1:9",
        partnerAgents=[
            {
                "agentName": CALLEE,
                "headers": {"X-Specmesh-Partner-Token": _ref(CALLER, "partner-token")},
            }
        ],
    )
    holder = SnapshotHolder()
    await holder.set(_snapshot(CALLER, spec, {}), etcd_revision=1)
    metrics = CollectorRegistry()
    async with (
        EngineServer(runner=runner, config=config) as engine,
        AgentCertificates(agent=CALLEE, pki=pki) as b_certs,
        AgentCertificates(agent=CALLER, pki=pki) as a_certs,
        CredentialResolver(source=vault) as resolver,
        GrpcInbound(
            agent_name=CALLEE,
            engine_grpc=engine.grpc_target,
            graph=graph,
            certificates=b_certs,
            calls=EngineCalls(registry=metrics, revision=lambda: 5),
        ) as inbound,
    ):
        instances = InMemoryInstanceSource(
            [
                Instance("b-http-only", CALLEE, "https://127.0.0.1:9", state="serving"),  # type: ignore[list-item]
                Instance(  # type: ignore[list-item]
                    "b-1",
                    CALLEE,
                    "https://127.0.0.1:9",
                    state="serving",
                    grpc_endpoint=inbound.target,
                ),
            ]
        )
        router = Router(instances=GrpcInstanceSource(instances), releases=InMemoryReleaseSource())
        async with GrpcEgress(
            snapshots=holder, credentials=resolver, router=router, certificates=a_certs
        ) as egress:
            yield Rig(
                runner, engine, inbound, egress, pki, router, b_certs.ca_pem, b_certs, metrics
            )


def _message(text: str) -> SendMessageRequest:
    return SendMessageRequest(
        message=Message(role=Role.ROLE_USER, message_id=uuid.uuid4().hex, parts=[Part(text=text)])
    )


async def egress_client(egress: str, card_url: str, target: str) -> Any:
    """An a2a-sdk client (GRPC binding, streaming) whose every call goes to the gRPC egress
    at ``egress`` naming ``target`` (as the engine calls); the card is read at ``card_url``."""

    def channel(_url: str) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(
            egress, interceptors=[_TargetUnary(target), _TargetStream(target)]
        )

    config = ClientConfig(
        streaming=True,
        supported_protocol_bindings=[TransportProtocol.GRPC],
        grpc_channel_factory=channel,
    )
    return await create_client(card_url, client_config=config)


async def _client(rig: Rig, target: str) -> Any:
    return await egress_client(rig.egress.target, rig.engine.http_url, target)


async def _collect(stream: AsyncIterator[StreamResponse]) -> list[StreamResponse]:
    async with asyncio.timeout(WAIT):
        return [event async for event in stream]


async def test_stream_goes_through_both_sidecars_with_caller_identity(rig: Rig) -> None:
    rig.runner.enqueue(ScriptedTurn.answer("over grpc", chunks=["over ", "grpc"]))
    async with await _client(rig, CALLEE) as client:
        events = await _collect(client.send_message(_message("hello b")))

    chunks = [e.artifact_update for e in events if e.HasField("artifact_update")]
    assert [c.artifact.parts[0].text for c in chunks] == ["over ", "grpc", "over grpc"]
    assert events[-1].status_update.status.state == TaskState.TASK_STATE_COMPLETED
    [request] = rig.runner.requests
    assert request.text == "hello b"
    assert request.headers[CALLER_KEY] == CALLER
    # the partner's spec header, resolved from Vault by egress A, reached engine B as metadata
    assert request.headers["x-specmesh-partner-token"] == "tok-from-vault"


def _engine_calls(metrics: CollectorRegistry) -> dict[tuple[str, str, str], float]:
    return {
        (s.labels["revision"], s.labels["kind"], s.labels["outcome"]): s.value
        for m in metrics.collect()
        for s in m.samples
        if s.name == "specmesh_sidecar_engine_requests_total"
    }


async def test_the_inbound_counts_the_turns_it_relays_by_revision_and_outcome(rig: Rig) -> None:
    rig.runner.enqueue(ScriptedTurn.answer("fine"))
    rig.runner.enqueue(ScriptedTurn.failure("model_error", "the model failed"))
    async with await _client(rig, CALLEE) as client:
        answered = await _collect(client.send_message(_message("one")))
        failed = await _collect(client.send_message(_message("two")))
    assert answered[-1].status_update.status.state == TaskState.TASK_STATE_COMPLETED
    assert failed[-1].status_update.status.state == TaskState.TASK_STATE_FAILED
    error = await _get_task_error(rig.egress.target, CALLEE)
    assert error.code() == grpc.StatusCode.NOT_FOUND

    # the engine's failed task is a failed turn though the call ended OK; a lookup of an
    # unknown task is the caller's mistake, and no turn
    assert _engine_calls(rig.metrics) == {
        ("5", "message", "ok"): 1,
        ("5", "message", "a2a_error"): 1,
        ("5", "other", "client_error"): 1,
    }


async def _get_task_error(egress: str, agent: str) -> grpc.aio.AioRpcError:
    """The error of a GetTask of an unknown task through the gRPC egress at ``egress`` to
    ``agent`` (an engine answers NOT_FOUND; a refusal, its own status)."""
    async with grpc.aio.insecure_channel(egress) as channel:
        call = channel.unary_unary(f"/{A2A_SERVICE}/GetTask")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(
                GetTaskRequest(id="no-such-task").SerializeToString(),
                metadata=[(TARGET_KEY, agent)],
                timeout=WAIT,
            )
    return info.value


async def test_unary_call_goes_through(rig: Rig) -> None:
    error = await _get_task_error(rig.egress.target, CALLEE)
    # the engine answered (unknown task), so the call went all the way through
    assert error.code() == grpc.StatusCode.NOT_FOUND


def _rich_status(error: BaseException) -> tuple[grpc.StatusCode, status_pb2.Status]:
    """The gRPC code and the ``google.rpc.Status`` in the trailers of the call behind an
    a2a-sdk client error."""
    call = error.__cause__
    assert isinstance(call, grpc.aio.AioRpcError), repr(error)
    [details_bin] = [v for k, v in call.trailing_metadata() if k == "grpc-status-details-bin"]
    return call.code(), status_pb2.Status.FromString(details_bin)


def _error_info(status: status_pb2.Status) -> error_details_pb2.ErrorInfo:
    [info] = [
        error_details_pb2.ErrorInfo.FromString(d.value)
        for d in status.details
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)
    ]
    return info


async def test_unknown_task_is_the_sdks_task_not_found_with_error_info(rig: Rig) -> None:
    async with await _client(rig, CALLEE) as client:
        with pytest.raises(TaskNotFoundError) as info:
            async with asyncio.timeout(WAIT):
                await client.get_task(GetTaskRequest(id="no-such-task"))

    code, status = _rich_status(info.value)
    assert code == grpc.StatusCode.NOT_FOUND
    assert status.code == grpc.StatusCode.NOT_FOUND.value[0]
    error_info = _error_info(status)
    assert (error_info.domain, error_info.reason) == ("a2a-protocol.org", "TASK_NOT_FOUND")


async def test_streaming_error_keeps_its_code_and_error_info(rig: Rig) -> None:
    async with await _client(rig, CALLEE) as client:
        with pytest.raises(TaskNotFoundError) as info:
            await _collect(client.subscribe(SubscribeToTaskRequest(id="no-such-task")))

    code, status = _rich_status(info.value)
    assert code == grpc.StatusCode.NOT_FOUND
    assert _error_info(status).reason == "TASK_NOT_FOUND"


_UPSTREAM_TRAILERS = (
    ("x-upstream", "kept"),
    ("grpc-status-details-bin", status_pb2.Status(code=10, message="busy").SerializeToString()),
)


@pytest.fixture
async def failing_upstream() -> AsyncIterator[str]:
    """A gRPC server for the A2A service whose ``SendStreamingMessage`` sends one event, then
    fails with ABORTED and :data:`_UPSTREAM_TRAILERS`; ``GetTask`` fails the same way."""

    async def get_task(_request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.ABORTED, "busy", _UPSTREAM_TRAILERS)
        raise AssertionError("unreachable")

    async def stream(_request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        yield StreamResponse().SerializeToString()
        await context.abort(grpc.StatusCode.ABORTED, "busy", _UPSTREAM_TRAILERS)

    handlers = {
        "GetTask": grpc.unary_unary_rpc_method_handler(get_task),
        "SendStreamingMessage": grpc.unary_stream_rpc_method_handler(stream),
    }
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(A2A_SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def test_status_details_and_trailers_pass_through_even_mid_stream(
    failing_upstream: str,
) -> None:
    inbound = GrpcInbound(
        agent_name=CALLEE,
        engine_grpc=failing_upstream,
        graph=InMemoryPartnerGraph({}),
        certificates=None,
    )
    async with inbound, grpc.aio.insecure_channel(inbound.target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as unary:
            await channel.unary_unary(f"/{A2A_SERVICE}/GetTask")(b"", timeout=WAIT)
        received: list[bytes] = []
        with pytest.raises(grpc.aio.AioRpcError) as streamed:
            call = channel.unary_stream(f"/{A2A_SERVICE}/SendStreamingMessage")(b"", timeout=WAIT)
            async for message in call:
                received.append(message)

    assert len(received) == 1
    for error in (unary.value, streamed.value):
        assert (error.code(), error.details()) == (grpc.StatusCode.ABORTED, "busy")
        assert tuple(error.trailing_metadata()) == _UPSTREAM_TRAILERS


async def test_caller_not_listing_this_agent_is_permission_denied(rig: Rig) -> None:
    async with AgentCertificates(agent="stranger", pki=rig.pki) as stranger:
        cert = stranger.current
        creds = grpc.ssl_channel_credentials(
            root_certificates=stranger.ca_pem.encode(),
            private_key=cert.private_key.encode(),
            certificate_chain=(cert.certificate + "\n" + cert.ca_chain).encode(),
        )
        options = [("grpc.ssl_target_name_override", agent_dns_name(CALLEE))]
        async with grpc.aio.secure_channel(rig.inbound.target, creds, options=options) as channel:
            call = channel.unary_unary(f"/{A2A_SERVICE}/SendMessage")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(_message("let me in").SerializeToString(), timeout=WAIT)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert rig.runner.requests == []


async def test_caller_without_certificate_is_refused(rig: Rig) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=rig.ca_pem.encode())
    options = [("grpc.ssl_target_name_override", agent_dns_name(CALLEE))]
    async with grpc.aio.secure_channel(rig.inbound.target, creds, options=options) as channel:
        call = channel.unary_unary(f"/{A2A_SERVICE}/SendMessage")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(_message("no cert").SerializeToString(), timeout=5)
    assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)
    assert rig.runner.requests == []


async def test_undeclared_target_is_refused_by_the_egress(rig: Rig) -> None:
    async with await _client(rig, "not-a-partner") as client:
        with pytest.raises(Exception) as info:
            await _collect(client.send_message(_message("hi")))
    assert "PERMISSION_DENIED" in repr(info.value) or "not declared" in str(info.value)
    assert rig.runner.requests == []


async def _served_serial(rig: Rig, ctx: ssl.SSLContext) -> int:
    """Serial of the certificate the gRPC inbound presents to a new TLS connection."""
    ctx.set_alpn_protocols(["h2"])
    host, port = rig.inbound.target.rsplit(":", 1)
    _reader, writer = await asyncio.open_connection(
        host, int(port), ssl=ctx, server_hostname=agent_dns_name(CALLEE)
    )
    try:
        return int(writer.get_extra_info("peercert")["serialNumber"], 16)
    finally:
        writer.close()


async def test_rotated_certificate_is_served_to_new_connections(rig: Rig) -> None:
    async with AgentCertificates(agent=CALLER, pki=rig.pki) as a:
        before = await _served_serial(rig, a.client_context)
        assert before == rig.b_certs.current.serial_int
        await rig.b_certs.rotate()
        after = await _served_serial(rig, a.client_context)
    assert after == rig.b_certs.current.serial_int != before
    # calls through the sidecars keep working after the rotation
    async with await _client(rig, CALLEE) as client:
        events = await _collect(client.send_message(_message("after rotation")))
    assert events[-1].status_update.status.state == TaskState.TASK_STATE_COMPLETED
    assert rig.runner.requests[-1].headers[CALLER_KEY] == CALLER


def test_registry_entry_carries_grpc_endpoint_only_when_set() -> None:
    plain = Instance("i", CALLEE, "https://127.0.0.1:1")
    assert "grpcEndpoint" not in plain.to_json()
    with_grpc = Instance("i", CALLEE, "https://127.0.0.1:1", grpc_endpoint="127.0.0.1:2")
    assert with_grpc.to_json()["grpcEndpoint"] == "127.0.0.1:2"
    assert Instance.from_json(with_grpc.to_json()) == with_grpc
    assert Instance.from_json(plain.to_json()).grpc_endpoint is None


async def test_unreachable_instance_is_unavailable_and_counts_as_gateway_error(
    rig: Rig, vault: VaultClient
) -> None:
    dead = InMemoryInstanceSource(
        [
            Instance(  # type: ignore[list-item]
                "b-dead",
                CALLEE,
                "https://x",
                state="serving",
                grpc_endpoint=f"127.0.0.1:{free_port()}",
            )
        ]
    )
    router = Router(instances=GrpcInstanceSource(dead), releases=InMemoryReleaseSource())
    holder = SnapshotHolder()
    spec = _spec(CALLER, "http://127.0.0.1:9", partnerAgents=[{"agentName": CALLEE}])
    await holder.set(_snapshot(CALLER, spec, {}), etcd_revision=1)
    async with (
        CredentialResolver(source=vault) as resolver,
        GrpcEgress(
            snapshots=holder, credentials=resolver, router=router, certificates=rig.b_certs
        ) as egress,
    ):
        error = await _get_task_error(egress.target, CALLEE)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert _call_error_info(error).reason == "UPSTREAM_UNREACHABLE"
    # the first try and the two retries of the default policy, each a gateway error
    assert router.detector(CALLEE).state("b-dead").consecutive_gateway == 3


# ---------------------------------------------------------------- HTTP and gRPC agree


def _call_error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    details_bin = dict(error.trailing_metadata() or ())["grpc-status-details-bin"]
    return _error_info(status_pb2.Status.FromString(details_bin))


class _FirstChoice(random.Random):
    """The router's rng picking the first candidate (the instance listed first)."""

    def choice(self, seq: Any) -> Any:
        return seq[0]


@dataclass
class Egresses:
    """An HTTP and a gRPC egress of agent A over one snapshot and one instance list."""

    http: EgressProxy
    grpc: GrpcEgress
    http_router: Router
    grpc_router: Router
    retried: list[str]


@pytest.fixture
async def egresses(rig: Rig, vault: VaultClient) -> AsyncIterator[Egresses]:
    """Instances of B: a dead one listed first (the router's first choice), then the live
    one (its HTTP endpoint: engine B's HTTP listener; its gRPC endpoint: B's inbound)."""
    instances = InMemoryInstanceSource(
        [
            Instance(  # type: ignore[list-item]
                "b-dead",
                CALLEE,
                f"http://127.0.0.1:{free_port()}",
                state="serving",
                grpc_endpoint=f"127.0.0.1:{free_port()}",
            ),
            Instance(  # type: ignore[list-item]
                "b-live",
                CALLEE,
                rig.engine.http_url,
                state="serving",
                grpc_endpoint=rig.inbound.target,
            ),
        ]
    )
    releases = InMemoryReleaseSource()
    http_router = Router(instances=instances, releases=releases, rng=_FirstChoice())
    grpc_router = Router(
        instances=GrpcInstanceSource(instances), releases=releases, rng=_FirstChoice()
    )
    holder = SnapshotHolder()
    spec = _spec(CALLER, "http://127.0.0.1:9", partnerAgents=[{"agentName": CALLEE}])
    await holder.set(_snapshot(CALLER, spec, {}), etcd_revision=1)
    retried: list[str] = []
    async with (
        AgentCertificates(agent=CALLER, pki=rig.pki) as a_certs,
        CredentialResolver(source=vault) as resolver,
        EgressProxy(
            snapshots=holder, credentials=resolver, router=http_router, registry=CollectorRegistry()
        ) as http_egress,
        GrpcEgress(
            snapshots=holder,
            credentials=resolver,
            router=grpc_router,
            certificates=a_certs,
            on_retry=retried.append,
        ) as grpc_egress,
    ):
        yield Egresses(http_egress, grpc_egress, http_router, grpc_router, retried)


async def _http_error(egresses: Egresses, target: str) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{egresses.http.url}/a2a/{target}/v1/message:send", json={}) as r,
    ):
        return r.status, (await r.json())["error"]


@pytest.mark.parametrize(
    ("target", "reason", "http_status", "grpc_code"),
    [
        ("9-lives", "INVALID_TARGET", 400, grpc.StatusCode.INVALID_ARGUMENT),
        ("stranger-agent", "NOT_DECLARED", 403, grpc.StatusCode.PERMISSION_DENIED),
    ],
)
async def test_malformed_and_undeclared_targets_get_the_same_answer_on_http_and_grpc(
    egresses: Egresses,
    rig: Rig,
    target: str,
    reason: str,
    http_status: int,
    grpc_code: grpc.StatusCode,
) -> None:
    status, http_error = await _http_error(egresses, target)
    grpc_error = await _get_task_error(egresses.grpc.target, target)

    assert status == http_status == POLICY_ERRORS[reason].http_status
    assert http_error["details"][0]["reason"] == reason
    assert grpc_error.code() == grpc_code == POLICY_ERRORS[reason].grpc_code
    assert _call_error_info(grpc_error).reason == reason
    assert grpc_error.details() == http_error["message"]
    assert repr(target) in http_error["message"]
    assert rig.runner.requests == []


async def test_grpc_retries_an_instance_it_cannot_connect_to_as_http_does(
    egresses: Egresses, rig: Rig
) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{egresses.http.url}/a2a/{CALLEE}/.well-known/agent-card.json") as r,
    ):
        http_status = r.status
    http_retries = egresses.http.metrics.retries.labels(agent=CALLEE)._value.get()

    grpc_error = await _get_task_error(egresses.grpc.target, CALLEE)

    # HTTP: the dead instance failed, the live one answered
    assert http_status == 200
    assert http_retries == 1
    assert egresses.http_router.detector(CALLEE).state("b-dead").consecutive_gateway == 1
    # gRPC: the same -- the live instance's engine answered (its own NOT_FOUND, relayed)
    assert grpc_error.code() == grpc.StatusCode.NOT_FOUND
    assert egresses.retried == [CALLEE]
    assert egresses.grpc_router.detector(CALLEE).state("b-dead").consecutive_gateway == 1
    assert egresses.grpc_router.detector(CALLEE).state("b-live").consecutive_gateway == 0


# ---------------------------------------------------------------- cost budget


@contextlib.asynccontextmanager
async def _stopped(server: GrpcInbound) -> AsyncIterator[None]:
    """Stops a server started beforehand (its port was needed first)."""
    try:
        yield
    finally:
        await server.stop()


async def test_the_grpc_egress_refuses_over_its_own_ledger_and_sends_the_partner_what_is_left(
    rig: Rig, vault: VaultClient
) -> None:
    ledger, b_ledger = BudgetLedger(), BudgetLedger()
    spent, funded = ledger.open(0.5), ledger.open(1.0)
    spent.charge(0.5)
    funded.charge(0.25)
    b_inbound = GrpcInbound(
        agent_name=CALLEE,
        engine_grpc=rig.engine.grpc_target,
        graph=InMemoryPartnerGraph({CALLER: [CALLEE]}),
        certificates=rig.b_certs,
        ledger=b_ledger,
    )
    await b_inbound.start()
    instances = InMemoryInstanceSource(
        [
            Instance(  # type: ignore[list-item]
                "b-1",
                CALLEE,
                "https://127.0.0.1:9",
                state="serving",
                grpc_endpoint=b_inbound.target,
            )
        ]
    )
    router = Router(instances=GrpcInstanceSource(instances), releases=InMemoryReleaseSource())
    holder = SnapshotHolder()
    spec = _spec(CALLER, "http://127.0.0.1:9", partnerAgents=[{"agentName": CALLEE}])
    await holder.set(_snapshot(CALLER, spec, {}), etcd_revision=1)
    lie = (BUDGET_HEADER, "1000000")  # what the engine claims is left: never read
    async with (
        _stopped(b_inbound),
        AgentCertificates(agent=CALLER, pki=rig.pki) as a_certs,
        CredentialResolver(source=vault) as resolver,
        GrpcEgress(
            snapshots=holder,
            credentials=resolver,
            router=router,
            certificates=a_certs,
            ledger=ledger,
        ) as egress,
        grpc.aio.insecure_channel(egress.target) as channel,
    ):
        send = channel.unary_unary(f"/{A2A_SERVICE}/SendMessage")
        request = _message("spend").SerializeToString()
        refused = []
        for metadata in (
            [(TARGET_KEY, CALLEE), (LEDGER_HEADER, spent.id), lie],
            [(TARGET_KEY, CALLEE), lie],  # no entry named while budgets are open
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await send(request, metadata=metadata, timeout=WAIT)
            refused.append(info.value)
        answer = await send(
            request, metadata=[(TARGET_KEY, CALLEE), (LEDGER_HEADER, funded.id), lie], timeout=WAIT
        )

    (reached,) = rig.runner.requests  # only the funded call reached agent B
    assert [e.code() for e in refused] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
    assert [_call_error_info(e).reason for e in refused] == ["BUDGET_EXCEEDED"] * 2
    assert (
        refused[0]
        .details()
        .startswith(
            f"budget exceeded: the call to agent {CALLEE!r} is refused: the request's budget is "
            "$0.5, $0 is left"
        )
    )
    assert answer  # B answered
    # B's sidecar opened B's entry with what A's sidecar had left; B's engine gets only its id
    b_entry = b_ledger.entry(reached.headers, "a call")
    assert b_entry is not None and b_entry.budget_usd == 0.75 and b_entry.closed
    assert BUDGET_HEADER not in reached.headers and BUDGET_TOTAL_HEADER not in reached.headers
