"""mTLS with certificates from real OpenBao PKI: who may call, rotation, outbound to partners."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from localfleet.installer import LocalServices
from sidecar.credentials import CredentialResolver
from sidecar.egress import EgressProxy
from sidecar.inbound import CALLER_HEADER, EtcdPartnerGraph, InboundServer, InMemoryPartnerGraph
from sidecar.mtls import (
    AgentCertificates,
    PkiClient,
    agent_dns_name,
    client_context,
    load_certificate,
    pki_issue_policy,
    setup_pki,
)
from sidecar.router import InMemoryInstanceSource, InMemoryReleaseSource, Instance, Router
from sidecar.state import SnapshotHolder
from specmesh.ports import free_port
from specmesh.spec.models import AgentSpec
from specmesh.store import SpecStore
from specmesh.vault import VaultClient
from tests.integration.test_sidecar_egress import _snapshot, _spec
from tests.polling import eventually

pytestmark = pytest.mark.integration

CALLEE = "callee-x"


@dataclass
class Engine:
    """An in-test engine HTTP listener echoing who called."""

    callers: list[str | None] = field(default_factory=list)
    runner: web.AppRunner | None = None
    address: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.callers.append(request.headers.get(CALLER_HEADER))
        return web.json_response(
            {"path": request.path, "caller": request.headers.get(CALLER_HEADER)}
        )

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.address = f"127.0.0.1:{port}"


@pytest.fixture
async def pki(services: LocalServices, vault: VaultClient) -> AsyncIterator[PkiClient]:
    await setup_pki(address=services.bao.address, token=services.bao.root_token)
    await vault.put_policy("specmesh-pki-issue", pki_issue_policy())
    token = await vault.create_token(policies=["specmesh-pki-issue"])
    client = PkiClient(address=services.bao.address, token=token)
    yield client
    await client.close()


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    eng = Engine()
    await eng.start()
    yield eng
    assert eng.runner is not None
    await eng.runner.cleanup()


@pytest.fixture
async def callee(
    pki: PkiClient, engine: Engine
) -> AsyncIterator[tuple[InboundServer, AgentCertificates]]:
    certs = AgentCertificates(agent=CALLEE, pki=pki, ttl=300)
    await certs.start()
    graph = InMemoryPartnerGraph({"caller-ok": [CALLEE], "caller-bad": ["someone-else"]})
    inbound = InboundServer(
        agent_name=CALLEE, engine_http=engine.address, graph=graph, certificates=certs
    )
    await inbound.start()
    yield inbound, certs
    await inbound.stop()
    await certs.close()


async def _get(url: str, ctx: Any) -> tuple[int, dict[str, Any]]:
    hostname = agent_dns_name(CALLEE) if ctx is not None else None
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, ssl=ctx, server_hostname=hostname) as r,
    ):
        return r.status, await r.json()


async def _raw_get(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str
) -> tuple[int, str]:
    """One keep-alive HTTP/1.1 GET on an open connection; (status, peer serial)."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: callee\r\n\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode().split("\r\n")
    length = next(
        int(v) for k, _, v in (h.partition(": ") for h in lines) if k.lower() == "content-length"
    )
    await asyncio.wait_for(reader.readexactly(length), 10)
    return int(lines[0].split()[1]), str(writer.get_extra_info("peercert")["serialNumber"])


async def _refused_by_tls(url: str, ctx: Any) -> bool:
    try:
        await _get(url, ctx)
    except (aiohttp.ClientError, ConnectionError):
        return True
    return False


async def test_only_allowed_callers_with_valid_certificates_pass(
    services: LocalServices, pki: PkiClient, engine: Engine, callee: Any
) -> None:
    inbound, certs = callee
    url = inbound.url + "/v1/card"
    async with (
        AgentCertificates(agent="caller-ok", pki=pki) as ok,
        AgentCertificates(agent="caller-bad", pki=pki) as bad,
    ):
        status_ok, body_ok = await _get(url, ok.client_context)
        status_bad, body_bad = await _get(url, bad.client_context)

    no_cert = client_context(certs.ca_pem)
    expired_ctx = client_context(certs.ca_pem)
    expired = await pki.issue("caller-ok", ttl=1)
    load_certificate(expired_ctx, expired)

    async def is_expired() -> bool:
        return time.time() > expired.not_after.timestamp() + 0.5

    await eventually(is_expired, timeout=10, what="the 1 s certificate to expire")
    foreign_mount = f"foreign-{uuid.uuid4().hex[:6]}"
    await setup_pki(
        address=services.bao.address, token=services.bao.root_token, mount=foreign_mount
    )
    foreign_pki = PkiClient(
        address=services.bao.address, token=services.bao.root_token, mount=foreign_mount
    )
    foreign_ctx = client_context(certs.ca_pem)
    load_certificate(foreign_ctx, await foreign_pki.issue("caller-ok", ttl=300))
    await foreign_pki.close()

    assert (status_ok, body_ok) == (200, {"path": "/v1/card", "caller": "caller-ok"})
    assert status_bad == 403 and "caller-bad" in body_bad["error"]["message"]
    assert await _refused_by_tls(url, no_cert)
    assert await _refused_by_tls(url, expired_ctx)
    assert await _refused_by_tls(url, foreign_ctx)
    assert engine.callers == ["caller-ok"]


async def test_rotation_keeps_open_connections_and_new_handshakes_see_the_new_serial(
    pki: PkiClient, callee: Any
) -> None:
    inbound, certs = callee

    async with AgentCertificates(agent="caller-ok", pki=pki) as caller:

        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.open_connection(
                inbound.host,
                inbound.port,
                ssl=caller.client_context,
                server_hostname=agent_dns_name(CALLEE),
            )

        kept_reader, kept_writer = await connect()
        status_1, first = await _raw_get(kept_reader, kept_writer, "/v1/card")
        old = certs.current.serial_int
        await certs.rotate()
        status_2, on_kept_connection = await _raw_get(kept_reader, kept_writer, "/v1/card")
        new_reader, new_writer = await connect()
        status_3, on_new_handshake = await _raw_get(new_reader, new_writer, "/v1/card")
        for w in (kept_writer, new_writer):
            w.close()
            await w.wait_closed()

    assert (status_1, status_2, status_3) == (200, 200, 200)
    assert int(first, 16) == old
    assert on_kept_connection == first  # same connection, same handshake: not dropped
    assert int(on_new_handshake, 16) == certs.current.serial_int != old


async def test_certificate_rotates_at_two_thirds_of_its_ttl(pki: PkiClient) -> None:
    asked: list[float] = []  # the rotation loop's clock, injected: what it waits for

    async def sleep(seconds: float) -> None:
        asked.append(seconds)
        if len(asked) > 1:
            await asyncio.Event().wait()  # after the first rotation: wait until closed

    async with AgentCertificates(agent="short-lived", pki=pki, ttl=300, sleep=sleep) as certs:
        first = certs.current.serial
        await eventually(lambda: certs.rotations >= 1, timeout=10, what="the certificate to rotate")

    assert certs.current.serial != first
    assert asked[0] == pytest.approx(200)  # two thirds of the 300 s TTL
    assert asked[1] == pytest.approx(200)  # and again for the new certificate


async def test_egress_calls_partner_sidecars_over_mtls_and_checks_their_identity(
    services: LocalServices, vault: VaultClient, pki: PkiClient, engine: Engine, callee: Any
) -> None:
    inbound, _ = callee
    spec = _spec(
        "caller-ok",
        "http://127.0.0.1:9",
        partnerAgents=[{"agentName": CALLEE}, {"agentName": "impostor-target"}],
    )
    holder = SnapshotHolder()
    await holder.set(_snapshot("caller-ok", spec, {}), etcd_revision=1)
    instances = InMemoryInstanceSource(
        [
            Instance("i1", CALLEE, inbound.url),
            # registered as another agent, but the endpoint presents callee-x's certificate
            Instance("i2", "impostor-target", inbound.url),
        ]
    )
    router = Router(instances=instances, releases=InMemoryReleaseSource())
    async with (
        AgentCertificates(agent="caller-ok", pki=pki) as own,
        CredentialResolver(source=vault) as resolver,
    ):
        egress = EgressProxy(
            snapshots=holder,
            credentials=resolver,
            router=router,
            client_ssl=own.client_context,
            registry=CollectorRegistry(),
        )
        async with egress, aiohttp.ClientSession() as client:
            async with client.post(egress.url + f"/a2a/{CALLEE}/v1/message:send") as r:
                status, body = r.status, await r.json()
            async with client.post(egress.url + "/a2a/impostor-target/v1/message:send") as r:
                impostor_status, impostor = r.status, await r.json()

    assert (status, body) == (200, {"path": "/v1/message:send", "caller": "caller-ok"})
    assert impostor_status == 502
    assert impostor["error"]["details"][0]["reason"] == "UPSTREAM_IDENTITY"


async def test_plaintext_mode_proxies_without_tls(engine: Engine) -> None:
    inbound = InboundServer(
        agent_name=CALLEE,
        engine_http=engine.address,
        graph=InMemoryPartnerGraph(),
        certificates=None,
    )
    async with inbound:
        assert inbound.url.startswith("http://")
        status, body = await _get(inbound.url + "/healthz?x=1", None)

    assert (status, body) == (200, {"path": "/healthz", "caller": None})


async def test_partner_graph_from_etcd_follows_changes(store: SpecStore) -> None:
    def spec(partners: list[str]) -> AgentSpec:
        return AgentSpec.model_validate(
            {
                "base": {"description": "d", "promptKey": "p"},
                "model": {"model": "m"},
                "partnerAgents": [{"agentName": p} for p in partners],
            }
        )

    await store.apply_agent("Caller_One", spec([CALLEE]), actor="test")
    graph = EtcdPartnerGraph(store=store)
    task = asyncio.create_task(graph.run())
    try:
        await asyncio.wait_for(graph.ready.wait(), 10)
        assert graph.partners("caller-one") == frozenset({CALLEE})

        await store.apply_agent("Caller_One", spec(["other-agent"]), actor="test")

        async def changed() -> bool:
            return graph.partners("Caller_One") == frozenset({"other-agent"})

        await eventually(changed, timeout=10, what="the partner graph to change")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
