"""Egress: credentials from real OpenBao injected into LLM and MCP calls, streaming, refusals."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from mcp import Client
from mcp.server.mcpserver import Context, MCPServer
from mcp.types import TextContent
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from starlette.requests import Request

from localfleet.installer import BaoProcess, LocalServices
from sidecar.credentials import CredentialResolver
from sidecar.egress import EgressProxy, llm_upstream_base
from sidecar.state import SnapshotHolder
from specmesh.ports import free_port
from specmesh.secrets import VaultRef
from specmesh.snapshot import PromptBundle, ResolvedSnapshot
from specmesh.spec.models import AgentSpec, McpServerSpec
from specmesh.vault import VaultClient, agent_policy, agent_policy_name, agent_secret_prefix
from tests.integration.asgi_server import serve_asgi
from tests.polling import eventually

pytestmark = pytest.mark.integration


# ---------------------------------------------------------------- helpers


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


@dataclass
class Upstream:
    """An in-test HTTP upstream recording what reaches it; ``/stream`` paths send one SSE
    chunk per permit put in ``gate``; ``/held`` paths answer on the first permit, then send
    a chunk per permit until their caller is gone (``cut`` is set then)."""

    seen: list[Seen] = field(default_factory=list)
    gate: asyncio.Queue[None] = field(default_factory=asyncio.Queue)
    cut: asyncio.Event = field(default_factory=asyncio.Event)
    runner: web.AppRunner | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(
            Seen(request.method, request.path, dict(request.query), dict(request.headers), body)
        )
        if request.path.endswith("/stream"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for i in range(3):
                await response.write(f"data: chunk-{i}\n\n".encode())
                if i < 2:
                    await self.gate.get()
            await response.write_eof()
            return response
        if request.path.endswith("/held"):
            await self.gate.get()
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            try:
                await response.prepare(request)
                while True:
                    await response.write(b"data: tick\n\n")
                    await self.gate.get()
            except ConnectionError:
                self.cut.set()
            return response
        return web.json_response({"ok": True, "path": request.path})

    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port or free_port())
        await site.start()
        self.port = int(site.name.rsplit(":", 1)[1])

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    await up.start()
    yield up
    await up.stop()


def _agent() -> str:
    return f"egress-{uuid.uuid4().hex[:8]}"


def _ref(agent: str, name: str) -> str:
    return f"vault://secret/{agent_secret_prefix(agent)}/{name}#value"


async def _agent_token(vault: VaultClient, agent: str) -> str:
    await vault.put_policy(agent_policy_name(agent), agent_policy(agent, mount="secret"))
    return await vault.create_token(policies=[agent_policy_name(agent)])


def _snapshot(agent: str, spec: dict[str, Any], mcp: dict[str, McpServerSpec]) -> ResolvedSnapshot:
    return ResolvedSnapshot(
        agent_name=agent,
        revision=1,
        track="stable",
        spec=AgentSpec.model_validate(spec),
        prompt=PromptBundle(),
        mcp_servers=mcp,
    )


def _spec(agent: str, base_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "base": {"description": "egress test", "promptKey": "egress-prompt"},
        "model": {"model": "scripted", "baseUrl": base_url, "apiKey": _ref(agent, "model")},
        **extra,
    }


@dataclass
class Rig:
    egress: EgressProxy
    resolver: CredentialResolver
    holder: SnapshotHolder
    client: aiohttp.ClientSession


@pytest.fixture
async def rig_factory() -> AsyncIterator[Callable[..., Awaitable[Rig]]]:
    opened: list[Any] = []

    async def make(
        *,
        address: str,
        token: str,
        snapshot: ResolvedSnapshot,
        ttl: float = 300.0,
        tracer: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> Rig:
        vault = VaultClient(address=address, token=token, timeout=2.0)
        resolver = CredentialResolver(source=vault, ttl=ttl, clock=clock)
        resolver.start()
        holder = SnapshotHolder()
        await holder.set(snapshot, etcd_revision=1)
        egress = EgressProxy(
            snapshots=holder, credentials=resolver, registry=CollectorRegistry(), tracer=tracer
        )
        await egress.start()
        client = aiohttp.ClientSession()
        opened.extend([client, egress, resolver, vault])
        return Rig(egress, resolver, holder, client)

    yield make
    for thing in opened:
        await thing.close() if not isinstance(thing, EgressProxy) else await thing.stop()


# ---------------------------------------------------------------- tests


async def _model_rig(
    rig_factory: Any,
    services: LocalServices,
    vault: VaultClient,
    agent: str,
    base_url: str,
    key: str | None = None,
    **options: Any,
) -> Rig:
    """A rig for ``agent`` whose model is at ``base_url``; ``key``, when given, is its key
    written to Vault first."""
    if key is not None:
        await vault.write(VaultRef.parse(_ref(agent, "model")), key)
    rig: Rig = await rig_factory(
        address=services.bao.address,
        token=await _agent_token(vault, agent),
        snapshot=_snapshot(agent, _spec(agent, base_url), {}),
        **options,
    )
    return rig


def test_llm_base_appends_v1_unless_versioned() -> None:
    assert llm_upstream_base("https://x.example/compatible-mode", None) == (
        "https://x.example/compatible-mode/v1"
    )
    assert llm_upstream_base("https://x.example/api/v3/", None) == "https://x.example/api/v3"
    assert llm_upstream_base("https://open.bigmodel.cn/api/paas/v4", None).endswith("/v4")
    assert llm_upstream_base("http://127.0.0.1:9/v1beta", None).endswith("/v1beta")
    assert llm_upstream_base(None, "openai") == "https://api.openai.com/v1"


async def test_llm_call_gets_the_vault_key_and_engine_dummy_key_is_dropped(
    services: LocalServices, vault: VaultClient, upstream: Upstream, rig_factory: Any
) -> None:
    agent = _agent()
    await vault.write(VaultRef.parse(_ref(agent, "model")), "sk-from-vault-1")
    await vault.write(VaultRef.parse(_ref(agent, "anthropic")), "ak-from-vault")
    spec = _spec(
        agent,
        upstream.url,
        knowledge={"enabled": False},
    )
    spec["model"]["fallbacks"] = [
        {
            "model": "claude",
            "provider": "anthropic",
            "baseUrl": upstream.url + "/anthropic",
            "apiKey": _ref(agent, "anthropic"),
        }
    ]
    rig = await rig_factory(
        address=services.bao.address,
        token=await _agent_token(vault, agent),
        snapshot=_snapshot(agent, spec, {}),
    )
    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

    async with rig.client.post(
        rig.egress.url + "/llm/v1/chat/completions",
        json={"model": "scripted", "messages": []},
        headers={
            "Authorization": "Bearer sidecar-injected",
            "traceparent": trace,
            "tracestate": "vendor=1",
            "X-Specmesh-Call-Depth": "2",
        },
    ) as resp:
        assert resp.status == 200
    async with rig.client.post(
        rig.egress.url + "/llm/fallbacks/0/v1/messages",
        json={},
        headers={"Authorization": "Bearer sidecar-injected"},
    ) as resp:
        assert resp.status == 200
    async with rig.client.post(rig.egress.url + "/llm/embeddings/v1/embeddings", json={}) as resp:
        assert resp.status == 200
    async with rig.client.post(rig.egress.url + "/llm/fallbacks/3/v1/messages") as resp:
        assert resp.status == 404

    chat, anthropic, embeddings = upstream.seen
    assert chat.path == "/v1/chat/completions"
    assert chat.headers["Authorization"] == "Bearer sk-from-vault-1"
    assert chat.headers["traceparent"].split("-")[1] == trace.split("-")[1]  # same trace
    assert chat.headers["tracestate"] == "vendor=1"
    assert chat.headers["X-Specmesh-Call-Depth"] == "2"
    assert anthropic.path == "/anthropic/v1/messages"
    assert anthropic.headers["x-api-key"] == "ak-from-vault"
    assert "Authorization" not in anthropic.headers
    assert embeddings.path == "/v1/embeddings"
    assert embeddings.headers["Authorization"] == "Bearer sk-from-vault-1"


async def test_streaming_passes_through_chunk_by_chunk(
    services: LocalServices, vault: VaultClient, upstream: Upstream, rig_factory: Any
) -> None:
    agent = _agent()
    rig = await _model_rig(rig_factory, services, vault, agent, upstream.url, "sk-stream")

    async with rig.client.post(rig.egress.url + "/llm/v1/stream", json={}) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        received = b""
        for i in range(3):
            # The upstream sends chunk i+1 only after we got chunk i: no buffering on the way.
            while f"chunk-{i}".encode() not in received:
                received += await asyncio.wait_for(resp.content.readany(), 5)
            if i < 2:
                assert f"chunk-{i + 1}".encode() not in received
                upstream.gate.put_nowait(None)
        assert await resp.read() == b""


async def test_a_caller_hanging_up_mid_call_is_no_error_and_the_next_call_is_served(
    services: LocalServices,
    vault: VaultClient,
    upstream: Upstream,
    rig_factory: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent = _agent()
    rig = await _model_rig(rig_factory, services, vault, agent, upstream.url, "sk-hangup")
    caplog.set_level(logging.DEBUG)

    # the engine's call reaches the upstream, which holds its answer; the engine hangs up
    _, writer = await asyncio.open_connection(rig.egress.host, rig.egress.port)
    writer.write(b"POST /llm/v1/held HTTP/1.1\r\nHost: egress\r\nContent-Length: 2\r\n\r\n{}")
    await writer.drain()

    async def upstream_called() -> bool:
        return any(s.path.endswith("/held") for s in upstream.seen)

    await eventually(upstream_called, timeout=10, what="the call to reach the upstream")
    writer.close()
    await writer.wait_closed()

    async def upstream_cut() -> bool:  # the upstream answers, one more chunk per permit
        upstream.gate.put_nowait(None)
        return upstream.cut.is_set()

    await eventually(upstream_cut, timeout=10, what="the egress to close the upstream's call")
    async with rig.client.post(rig.egress.url + "/llm/v1/chat/completions", json={}) as resp:
        status = resp.status

    assert status == 200
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert any("closed its connection" in r.getMessage() for r in caplog.records)


async def test_rotated_secret_is_used_by_the_next_request_after_refresh(
    services: LocalServices, vault: VaultClient, upstream: Upstream, rig_factory: Any
) -> None:
    agent = _agent()
    ref = _ref(agent, "model")
    await vault.write(VaultRef.parse(ref), "sk-v1")
    rig = await _model_rig(rig_factory, services, vault, agent, upstream.url, ttl=0.5)
    url = rig.egress.url + "/llm/v1/chat/completions"

    async with rig.client.post(url, json={}) as resp:
        assert resp.status == 200
    await vault.write(VaultRef.parse(ref), "sk-v2")
    # A refresh that began after the write has completed once two more have completed.
    resolver: CredentialResolver = rig.resolver
    start = resolver.refreshes

    async def two_refreshes() -> bool:
        return resolver.refreshes >= start + 2

    await eventually(two_refreshes, timeout=10, what="two background refreshes")
    async with rig.client.post(url, json={}) as resp:
        assert resp.status == 200

    await vault.write(VaultRef.parse(ref), "sk-v3")
    rig.resolver.invalidate(ref)
    async with rig.client.post(url, json={}) as resp:
        assert resp.status == 200

    auth = [s.headers["Authorization"] for s in upstream.seen]
    assert auth == ["Bearer sk-v1", "Bearer sk-v2", "Bearer sk-v3"]


async def test_openbao_down_serves_from_cache_until_ttl_then_fails_clearly(
    tmp_path: Any, upstream: Upstream, rig_factory: Any
) -> None:
    bao = BaoProcess(data_dir=tmp_path / "bao", port=free_port(), cluster_port=free_port())
    await asyncio.to_thread(bao.start)
    try:
        agent = _agent()
        ref = _ref(agent, "model")
        root = VaultClient(address=bao.address, token=bao.root_token)
        await root.write(VaultRef.parse(ref), "sk-cached")
        token = await _agent_token(root, agent)
        await root.close()
        now = [0.0]  # the credential cache's clock, injected
        rig = await rig_factory(
            address=bao.address,
            token=token,
            snapshot=_snapshot(agent, _spec(agent, upstream.url), {}),
            ttl=300.0,
            clock=lambda: now[0],
        )
        url = rig.egress.url + "/llm/v1/chat/completions"
        async with rig.client.post(url, json={}) as resp:
            assert resp.status == 200

        await asyncio.to_thread(bao.stop)
        now[0] = 299.0  # OpenBao is down: the cached value serves until its TTL is up
        assert rig.resolver.expires_in(ref) == pytest.approx(1.0)
        async with rig.client.post(url, json={}) as resp:
            served_while_down = resp.status
        now[0] = 300.0  # and no longer once it is
        async with rig.client.post(url, json={}) as resp:
            failure = {"status": resp.status, "body": await resp.json()}
    finally:
        await asyncio.to_thread(bao.stop)

    assert served_while_down == 200
    assert failure["status"] == 503
    error = failure["body"]["error"]
    assert error["details"][0]["reason"] == "CREDENTIAL_UNAVAILABLE"
    assert error["details"][0]["metadata"]["reference"] == ref
    assert ref in error["message"]
    assert "sk-cached" not in str(failure["body"])
    assert all(s.headers["Authorization"] == "Bearer sk-cached" for s in upstream.seen)


def _echo_mcp_server() -> MCPServer:
    """A real MCP server whose tool answers with what its HTTP request carried."""
    server = MCPServer("gaode")

    @server.tool()
    def whoami(ctx: Context) -> str:
        """The credential header and the query parameters this call arrived with."""
        request = ctx.request_context.request
        assert isinstance(request, Request)
        return json.dumps(
            {"header": request.headers.get("X-Gaode-Key"), "query": dict(request.query_params)}
        )

    return server


async def test_a_real_mcp_server_gets_the_injected_header_and_query_param(
    services: LocalServices, vault: VaultClient, rig_factory: Any
) -> None:
    agent = _agent()
    await vault.write(VaultRef.parse(_ref(agent, "model")), "sk-model")
    await vault.write(VaultRef.parse(_ref(agent, "gaode-header")), "hdr-secret")
    await vault.write(VaultRef.parse(_ref(agent, "gaode-query")), "qp-secret")
    spec = _spec(
        agent,
        "http://127.0.0.1:9",
        mcpServers=[
            {
                "mcpServerName": "gaode",
                "headers": {"X-Gaode-Key": _ref(agent, "gaode-header")},
                "queryParams": {"key": _ref(agent, "gaode-query")},
            }
        ],
    )
    async with serve_asgi(_echo_mcp_server().streamable_http_app()) as server_url:
        mcp = {"gaode": McpServerSpec(url=server_url + "/mcp")}
        rig = await rig_factory(
            address=services.bao.address,
            token=await _agent_token(vault, agent),
            snapshot=_snapshot(agent, spec, mcp),
        )
        # the official client, through the egress (the server's name is case-insensitive);
        # the caller's own query parameters are kept beside the injected one
        async with Client(rig.egress.url + "/mcp/Gaode?tenant=t1") as client:
            tools = [t.name for t in (await client.list_tools()).tools]
            result = await client.call_tool("whoami", {})

    assert tools == ["whoami"]
    assert not result.is_error
    [block] = result.content
    assert isinstance(block, TextContent)
    assert json.loads(block.text) == {
        "header": "hdr-secret",
        "query": {"tenant": "t1", "key": "qp-secret"},
    }


async def test_undeclared_mcp_server_or_partner_is_refused_and_logged(
    services: LocalServices,
    vault: VaultClient,
    upstream: Upstream,
    rig_factory: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent = _agent()
    rig = await _model_rig(rig_factory, services, vault, agent, upstream.url)
    caplog.set_level(logging.INFO)

    async with rig.client.post(rig.egress.url + "/mcp/not-mine", json={}) as resp:
        mcp_status, mcp_body = resp.status, await resp.json()
    async with rig.client.post(rig.egress.url + "/a2a/stranger-agent/v1/message:send") as resp:
        a2a_status, a2a_body = resp.status, await resp.json()
    async with rig.client.get(rig.egress.url + "/elsewhere") as resp:
        unknown_status = resp.status

    assert mcp_status == 403 and mcp_body["error"]["details"][0]["reason"] == "NOT_DECLARED"
    assert a2a_status == 403 and "stranger-agent" in a2a_body["error"]["message"]
    assert unknown_status == 404
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert any("not-mine" in m for m in refused)
    assert any("stranger-agent" in m for m in refused)
    assert upstream.seen == []


async def test_upstream_down_is_a_clear_502(
    services: LocalServices, vault: VaultClient, rig_factory: Any
) -> None:
    agent = _agent()
    dead = f"http://127.0.0.1:{free_port()}"
    rig = await _model_rig(rig_factory, services, vault, agent, dead, "sk-down")

    async with rig.client.post(rig.egress.url + "/llm/v1/chat/completions", json={}) as resp:
        status, body = resp.status, await resp.json()

    assert status == 502
    assert body["error"]["details"][0]["reason"] == "UPSTREAM_UNREACHABLE"
    assert dead in body["error"]["message"]
    assert "sk-down" not in str(body)


async def test_planted_canary_secret_is_on_the_wire_but_never_logged_or_returned(
    services: LocalServices,
    vault: VaultClient,
    upstream: Upstream,
    rig_factory: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    canary = f"CANARY-{uuid.uuid4().hex}"
    agent = _agent()
    await vault.write(VaultRef.parse(_ref(agent, "model")), canary)
    await vault.write(VaultRef.parse(_ref(agent, "mcp")), canary)
    spec = _spec(
        agent,
        upstream.url,
        mcpServers=[
            {"mcpServerName": "tools", "headers": {"X-Key": _ref(agent, "mcp")}},
            {"mcpServerName": "gone", "queryParams": {"key": _ref(agent, "mcp")}},
        ],
    )
    mcp = {
        "tools": McpServerSpec(url=upstream.url + "/mcp"),
        "gone": McpServerSpec(url=f"http://127.0.0.1:{free_port()}/mcp"),
    }
    rig = await rig_factory(
        address=services.bao.address,
        token=await _agent_token(vault, agent),
        snapshot=_snapshot(agent, spec, mcp),
    )
    caplog.set_level(logging.DEBUG)
    answers: list[str] = []

    for method, path in [
        ("POST", "/llm/v1/chat/completions"),
        ("POST", "/mcp/tools"),
        ("POST", "/mcp/gone"),
        ("POST", "/mcp/undeclared"),
        ("GET", "/llm/v1/stream"),
    ]:
        if path.endswith("/stream"):
            for _ in range(2):
                upstream.gate.put_nowait(None)
        async with rig.client.request(method, rig.egress.url + path, json={}) as resp:
            answers.append(str(resp.status) + str(dict(resp.headers)) + await resp.text())

    on_the_wire = [
        s.headers.get("Authorization", "") + s.headers.get("X-Key", "") for s in upstream.seen
    ]
    assert any(canary in w for w in on_the_wire)
    assert not [a for a in answers if canary in a]
    logged = [r.getMessage() + str(r.__dict__) for r in caplog.records]
    assert logged  # the refusal, at least, was logged
    assert not [line for line in logged if canary in line]


async def test_proxied_call_is_a_span_in_the_callers_trace(
    services: LocalServices, vault: VaultClient, upstream: Upstream, rig_factory: Any
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    agent = _agent()
    rig = await _model_rig(
        rig_factory,
        services,
        vault,
        agent,
        upstream.url,
        "sk-span-test",
        tracer=provider.get_tracer("test"),
    )
    trace_id, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"

    async with rig.client.post(
        rig.egress.url + "/llm/v1/chat/completions",
        json={"model": "scripted", "messages": []},
        headers={"traceparent": f"00-{trace_id}-{caller_span}-01"},
    ) as resp:
        assert resp.status == 200

    [span] = exporter.get_finished_spans()
    assert span.name == "egress llm"
    assert format(span.context.trace_id, "032x") == trace_id
    assert span.parent is not None and format(span.parent.span_id, "016x") == caller_span
    assert span.attributes is not None and span.attributes["http.response.status_code"] == 200
    assert "sk-span-test" not in str(dict(span.attributes))
    sent = upstream.seen[-1].headers["traceparent"].split("-")
    assert sent[1] == trace_id and sent[2] == format(span.context.span_id, "016x")
