"""Conversation affinity at the egress: the engine's conversation with a partner keeps the
partner's release track when the partner's canary weight changes, over the HTTP A2A egress
(the engine's own partner tool, JSON-RPC) and the gRPC egress (the official a2a-sdk client),
through the partner's mTLS inbounds (certificates from real OpenBao PKI) to two real partner
engines, one per track."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from a2a.client import ClientCallContext
from a2a.types.a2a_pb2 import Message, Part, Role, SendMessageRequest, TaskState
from a2a.utils.constants import PROTOCOL_VERSION_CURRENT, VERSION_HEADER
from prometheus_client import CollectorRegistry

from engine.server import EngineServer, ServerConfig
from engine.testing import ScriptedRunner
from engine.tools import ToolCallContext
from engine.tools.partners import PartnerTool
from sidecar.affinity import ConversationTracks
from sidecar.credentials import CredentialResolver
from sidecar.egress import EgressProxy
from sidecar.grpcproxy import GrpcEgress, GrpcInbound, GrpcInstanceSource
from sidecar.inbound import InboundServer, InMemoryPartnerGraph
from sidecar.mtls import AgentCertificates, PkiClient
from sidecar.registry import Instance
from sidecar.router import InMemoryInstanceSource, InMemoryReleaseSource, Router
from sidecar.state import SnapshotHolder
from specmesh.spec.models import ReleaseSpec
from specmesh.vault import VaultClient
from tests.integration.test_sidecar_egress import _snapshot, _spec
from tests.integration.test_sidecar_grpc import egress_client
from tests.integration.test_sidecar_mtls import pki  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration

CALLER = "affinity-a"
PARTNER = "affinity-b"
WAIT = 20.0
CANARY_2 = ReleaseSpec.model_validate({"canaryRevision": 2, "canaryWeight": 100})


@dataclass
class Rig:
    """CALLER's HTTP and gRPC egress (one conversation table) and PARTNER's two tracks;
    ``releases`` is PARTNER's release as both egress routers see it."""

    egress: EgressProxy
    grpc_egress: GrpcEgress
    stable: ScriptedRunner
    canary: ScriptedRunner
    card_url: str
    releases: InMemoryReleaseSource


async def _partner_instance(
    stack: AsyncExitStack, name: str, track: str, certs: AgentCertificates
) -> tuple[ScriptedRunner, Instance]:
    """A PARTNER engine behind its mTLS inbounds (HTTP and gRPC), as the registry lists it."""
    runner = ScriptedRunner()
    config = ServerConfig(agent_name=PARTNER, http_port=0, grpc_port=0, drain_timeout=2.0)
    engine = await stack.enter_async_context(EngineServer(runner=runner, config=config))
    graph = InMemoryPartnerGraph({CALLER: [PARTNER]})
    inbound = await stack.enter_async_context(
        InboundServer(
            agent_name=PARTNER, engine_http=engine.http_url, graph=graph, certificates=certs
        )
    )
    grpc_inbound = await stack.enter_async_context(
        GrpcInbound(
            agent_name=PARTNER, engine_grpc=engine.grpc_target, graph=graph, certificates=certs
        )
    )
    instance = Instance(
        name, PARTNER, inbound.url, track, state="serving", grpc_endpoint=grpc_inbound.target
    )
    return runner, instance


@pytest.fixture
async def rig(pki: PkiClient, vault: VaultClient) -> AsyncIterator[Rig]:  # noqa: F811
    holder = SnapshotHolder()
    spec = _spec(CALLER, "http://127.0.0.1:9", partnerAgents=[{"agentName": PARTNER}])
    await holder.set(_snapshot(CALLER, spec, {}), etcd_revision=1)
    async with AsyncExitStack() as stack:
        b_certs = await stack.enter_async_context(AgentCertificates(agent=PARTNER, pki=pki))
        a_certs = await stack.enter_async_context(AgentCertificates(agent=CALLER, pki=pki))
        resolver = await stack.enter_async_context(CredentialResolver(source=vault))
        stable, stable_instance = await _partner_instance(stack, "b-stable", "stable", b_certs)
        canary, canary_instance = await _partner_instance(stack, "b-canary", "canary", b_certs)
        instances = InMemoryInstanceSource([stable_instance, canary_instance])  # type: ignore[list-item]
        releases = InMemoryReleaseSource({PARTNER: CANARY_2})
        tracks = ConversationTracks(max_age=1800, max_entries=100)
        egress = await stack.enter_async_context(
            EgressProxy(
                snapshots=holder,
                credentials=resolver,
                router=Router(instances=instances, releases=releases),
                client_ssl=a_certs.client_context,
                registry=CollectorRegistry(),
                tracks=tracks,
            )
        )
        grpc_egress = await stack.enter_async_context(
            GrpcEgress(
                snapshots=holder,
                credentials=resolver,
                router=Router(instances=GrpcInstanceSource(instances), releases=releases),
                certificates=a_certs,
                tracks=tracks,
            )
        )
        card_url = f"{egress.url}/a2a/{PARTNER}"
        yield Rig(egress, grpc_egress, stable, canary, card_url, releases)


async def _ask_over_http(rig: Rig, conversation: str, text: str) -> str:
    """What the engine does for ``ask_<partner>`` in ``conversation``: a JSON-RPC
    SendMessage through the HTTP egress with the contextId it derives for the partner (its
    HTTP client, as the engine's, sends the A2A version)."""
    async with httpx.AsyncClient(headers={VERSION_HEADER: PROTOCOL_VERSION_CURRENT}) as http:
        tool = PartnerTool(caller=CALLER, partner=PARTNER, egress_url=rig.egress.url, http=http)
        context = ToolCallContext(context_id=conversation, call_depth=0, timeout=WAIT)
        return await tool.call({"message": text}, context=context)


async def _ask_over_grpc(
    rig: Rig, context_id: str, text: str, *, headers: dict[str, str] | None = None
) -> None:
    """A SendMessage in ``context_id`` through the gRPC egress (the target named in the
    metadata, as the engine names it; ``headers`` sent as metadata)."""

    request = SendMessageRequest(
        message=Message(
            role=Role.ROLE_USER,
            message_id=uuid.uuid4().hex,
            context_id=context_id,
            parts=[Part(text=text)],
        )
    )
    async with await egress_client(rig.grpc_egress.target, rig.card_url, PARTNER) as client:
        async with asyncio.timeout(WAIT):
            call = ClientCallContext(service_parameters=headers or {})
            events: list[Any] = [e async for e in client.send_message(request, context=call)]
    assert events[-1].status_update.status.state == TaskState.TASK_STATE_COMPLETED


def _seen(runner: ScriptedRunner) -> list[tuple[str, str]]:
    return [(r.text, r.context_id) for r in runner.requests]


async def test_a_partner_conversation_keeps_its_track_when_the_weight_changes(rig: Rig) -> None:
    """Canary weight 100: each conversation's first call goes to the partner's canary;
    after the weight drops to 0 its next call still goes there, a new conversation goes to
    stable; after an abort (no canary) it goes to stable -- over HTTP and gRPC."""
    grpc_context = f"grpc-{uuid.uuid4().hex}"
    assert await _ask_over_http(rig, "conv-1", "start http") == "echo: start http"
    await _ask_over_grpc(rig, grpc_context, "start grpc")
    [(_, http_context)] = [seen for seen in _seen(rig.canary) if seen[0] == "start http"]

    rig.releases.set(PARTNER, CANARY_2.model_copy(update={"canary_weight": 0}))
    await _ask_over_http(rig, "conv-1", "again http")
    await _ask_over_grpc(rig, grpc_context, "again grpc")
    await _ask_over_http(rig, "conv-2", "new http")
    await _ask_over_grpc(rig, f"grpc-{uuid.uuid4().hex}", "new grpc")

    rig.releases.set(PARTNER, ReleaseSpec())  # aborted: no canary any more
    await _ask_over_http(rig, "conv-1", "after abort http")
    await _ask_over_grpc(rig, grpc_context, "after abort grpc")

    assert _seen(rig.canary) == [
        ("start http", http_context),
        ("start grpc", grpc_context),
        ("again http", http_context),
        ("again grpc", grpc_context),
    ]
    assert [text for text, _ in _seen(rig.stable)] == [
        "new http",
        "new grpc",
        "after abort http",
        "after abort grpc",
    ]
    # the engine's contextId for the partner is its own per conversation, stable across turns
    assert [c for t, c in _seen(rig.stable) if t == "after abort http"] == [http_context]
    assert http_context != "conv-1"


async def test_header_match_still_sends_a_stable_conversation_to_the_canary(rig: Rig) -> None:
    """A conversation pinned to stable goes to the canary on a call matching the release's
    headerMatch (explicit routing wins), and back to stable on the next plain call."""
    release = ReleaseSpec.model_validate(
        {"canaryRevision": 2, "headerMatch": [{"name": "x-canary", "exact": "yes"}]}
    )
    rig.releases.set(PARTNER, release)
    context_id = f"grpc-{uuid.uuid4().hex}"

    await _ask_over_grpc(rig, context_id, "first")
    rig.releases.set(PARTNER, release.model_copy(update={"canary_weight": 100}))
    await _ask_over_grpc(rig, context_id, "still stable")
    rig.releases.set(PARTNER, release)
    await _ask_over_grpc(rig, context_id, "matched", headers={"x-canary": "yes"})
    await _ask_over_grpc(rig, context_id, "plain")

    assert [text for text, _ in _seen(rig.stable)] == ["first", "still stable", "plain"]
    assert _seen(rig.canary) == [("matched", context_id)]
