"""The whole sidecar -- sync, registry, data plane -- against real etcd, OpenBao (KV + PKI)
and a scripted model server: what the engine sends out gets its credential from Vault, and
what comes in needs a partner's certificate."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec

from localfleet.installer import LocalServices
from localfleet.modelserver import ScriptedModelServer
from sidecar.dataplane import DataPlane
from sidecar.main import Sidecar
from sidecar.mtls import AgentCertificates, PkiClient, agent_dns_name, setup_pki
from sidecar.settings import SidecarSettings
from specmesh.etcd import EtcdClient
from specmesh.keys import Keys
from specmesh.ports import free_port
from specmesh.secrets import VaultRef
from specmesh.spec.models import AgentSpec
from specmesh.spec_apply import SpecService
from specmesh.store import SpecStore
from specmesh.vault import VaultClient, agent_policy_name

pytestmark = pytest.mark.integration

CANARY = "sk-sidecar-canary-4711"


@pytest.fixture
async def model() -> AsyncIterator[ScriptedModelServer]:
    async with ScriptedModelServer() as server:
        yield server


@pytest.fixture
async def engine_stub() -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """Stands in for the engine's HTTP listener behind the inbound."""
    seen: list[dict[str, str]] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response({"engine": "ok", "path": request.path})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"127.0.0.1:{port}", seen
    await runner.cleanup()


async def test_sidecar_injects_vault_credentials_and_guards_inbound(
    services: LocalServices,
    store: SpecStore,
    etcd: EtcdClient,
    keys: Keys,
    vault: VaultClient,
    model: ScriptedModelServer,
    engine_stub: tuple[str, list[dict[str, str]]],
    tmp_path: Path,
) -> None:
    await setup_pki(address=services.bao.address, token=services.bao.root_token)
    ref = VaultRef(mount="secret", path="specmesh/agents/front/model/apiKey", field="value")
    await vault.write(ref, CANARY)
    spec = AgentSpec.model_validate(
        {
            "base": {"description": "front door", "promptKey": "p"},
            "model": {"model": "scripted", "baseUrl": model.url, "apiKey": str(ref)},
        }
    )
    await store.apply_agent("front", spec, actor="t")
    partner = AgentSpec.model_validate(
        {
            "base": {"description": "a caller", "promptKey": "p"},
            "model": {"model": "scripted"},
            "partnerAgents": [{"agentName": "front"}],
        }
    )
    await store.apply_agent("caller", partner, actor="t")
    # what apply does: the agent's policy and its own PKI role; then a token of that policy
    await SpecService(store=store, vault=vault, pki_mount="specmesh-pki").write_identity("front")
    token, _ = await vault.create_identity_token(
        policies=[agent_policy_name("front")], period="1h", display_name="front"
    )
    engine_addr, seen = engine_stub
    egress_port, inbound_port = free_port(), free_port()
    settings = SidecarSettings(
        agent_name="front",
        instance_id="front-1",
        sync_addr=f"unix:{tmp_path}/sync.sock",
        egress_url=f"http://127.0.0.1:{egress_port}",
        inbound=f"127.0.0.1:{inbound_port}",
        ops=f"127.0.0.1:{free_port()}",
        engine_http=engine_addr,
        home=tmp_path,
        etcd_endpoint=etcd.endpoint,
        etcd_prefix=keys.prefix,
        vault_addr=services.bao.address,
        vault_token=token,  # the agent's own identity, as the fleet gives it
        mtls=True,
    )
    sidecar = Sidecar(settings=settings, component_factories=[DataPlane])
    await sidecar.start()
    try:
        await asyncio.wait_for(sidecar.sync.wait_resolved(), 20)
        # egress: the engine sends no key; the model server receives the one from Vault
        async with aiohttp.ClientSession() as s:
            async with s.post(
                f"http://127.0.0.1:{egress_port}/llm/v1/chat/completions",
                json={"model": "scripted", "messages": [{"role": "user", "content": "hi"}]},
            ) as r:
                body = await r.json()
                assert r.status == 200, body
            assert body["choices"][0]["message"]["content"] == "scripted: hi"
            async with s.post(f"http://127.0.0.1:{egress_port}/mcp/undeclared") as r:
                assert r.status == 403
        recorded = model.requests(include_auth=True)
        assert recorded[-1].headers["authorization"] == f"Bearer {CANARY}"

        # inbound: no certificate -> refused; the partner "caller" with its certificate passes
        pki = PkiClient(address=services.bao.address, token=services.bao.root_token)
        async with AgentCertificates(agent="caller", pki=pki, ttl=60) as caller_certs:
            url = f"https://127.0.0.1:{inbound_port}/.well-known/agent-card.json"
            plain = ssl.create_default_context(cadata=caller_certs.ca_pem)
            plain.check_hostname = False
            async with aiohttp.ClientSession() as s:
                with pytest.raises(aiohttp.ClientError):
                    async with s.get(url, ssl=plain) as r:
                        await r.read()
                conn = aiohttp.TCPConnector(ssl=caller_certs.client_context)
                async with (
                    aiohttp.ClientSession(connector=conn) as s2,
                    s2.get(url, server_hostname=agent_dns_name("front")) as r,
                ):
                    assert r.status == 200, await r.text()
                    assert (await r.json())["engine"] == "ok"
        await pki.close()
        assert seen and seen[-1].get("X-Specmesh-Caller") == "caller"
    finally:
        await sidecar.stop()


async def test_sidecar_entry_takes_bearer_tokens_by_the_current_callers(
    services: LocalServices,
    store: SpecStore,
    etcd: EtcdClient,
    keys: Keys,
    vault: VaultClient,
    engine_stub: tuple[str, list[dict[str, str]]],
    tmp_path: Path,
) -> None:
    """The whole sidecar with ``SPECMESH_ENTRY`` and an inline-JWKS issuer: the card without a
    token, a token of an allowed principal reaches the engine as ``X-Specmesh-Principal``
    (never the token), and a new revision's ``callers`` applies at once."""
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = {**jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": "k"}
    issuer = {"issuer": "https://idp.test", "jwks": {"keys": [jwk]}, "audiences": ["{agent}"]}

    def spec(principals: list[str]) -> AgentSpec:
        return AgentSpec.model_validate(
            {
                "base": {
                    "description": "front door",
                    "promptKey": "p",
                    "callers": {"principals": principals},
                },
                "model": {"model": "scripted"},
            }
        )

    await store.apply_agent("front", spec(["https://idp.test/alice"]), actor="t")
    await SpecService(store=store, vault=vault, pki_mount="specmesh-pki").write_identity("front")
    token, _ = await vault.create_identity_token(
        policies=[agent_policy_name("front")], period="1h", display_name="front"
    )
    await setup_pki(address=services.bao.address, token=services.bao.root_token)
    engine_addr, seen = engine_stub
    entry_port = free_port()
    settings = SidecarSettings.model_validate(
        {
            "agent_name": "front",
            "instance_id": "front-1",
            "sync_addr": f"unix:{tmp_path}/sync.sock",
            "egress_url": f"http://127.0.0.1:{free_port()}",
            "inbound": f"127.0.0.1:{free_port()}",
            "entry": f"127.0.0.1:{entry_port}",
            "jwt_issuers": [issuer],
            "ops": f"127.0.0.1:{free_port()}",
            "engine_http": engine_addr,
            "home": tmp_path,
            "etcd_endpoint": etcd.endpoint,
            "etcd_prefix": keys.prefix,
            "vault_addr": services.bao.address,
            "vault_token": token,
            "mtls": True,
        }
    )
    now = int(time.time())
    claims = {"iss": "https://idp.test", "sub": "alice", "aud": "front", "exp": now + 300}
    bearer = jwt.encode(claims, key, algorithm="ES256", headers={"kid": "k"})
    url = f"http://127.0.0.1:{entry_port}"
    sidecar = Sidecar(settings=settings, component_factories=[DataPlane])
    await sidecar.start()
    try:
        await asyncio.wait_for(sidecar.sync.wait_resolved(), 20)
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/.well-known/agent-card.json") as r:
                assert r.status == 200
            async with s.post(url + "/") as r:
                assert r.status == 401
            headers = {"Authorization": f"Bearer {bearer}", "X-Specmesh-Principal": "me/admin"}
            async with s.post(url + "/", headers=headers) as r:
                assert r.status == 200
            assert seen[-1]["X-Specmesh-Principal"] == "https://idp.test/alice"
            assert "Authorization" not in seen[-1]
            # a new revision without alice: refused as soon as the sidecar has it
            version = sidecar.holder.version
            await store.apply_agent("front", spec(["https://idp.test/bob"]), actor="t")
            async with asyncio.timeout(20):
                while sidecar.holder.current is None or sidecar.holder.current.revision < 2:
                    version = await sidecar.holder.wait_newer(version)
            async with s.post(url + "/", headers=headers) as r:
                assert r.status == 403
                assert "callers.principals" in (await r.json())["error"]["message"]
        assert len(seen) == 2  # the card and alice's first call only
    finally:
        await sidecar.stop()
