"""specmesh.mcp_client: the one reconnecting MCP client, against a real MCP server."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator

import httpcore2
import pytest
from mcp.server.mcpserver import MCPServer

from specmesh.backoff import BackoffPolicy
from specmesh.mcp_client import ReconnectingMcpClient, tls_context
from specmesh.mcpbridge import serve_http
from specmesh.ports import free_port
from tests.polling import eventually

WAIT = 20.0
FAST = BackoffPolicy(initial=0.05, maximum=0.2, jitter=0.0)


@contextlib.asynccontextmanager
async def _server(port: int, tools: list[str]) -> AsyncIterator[None]:
    mcp = MCPServer("echo")
    for name in tools:
        mcp.add_tool(lambda: "ok", name=name, description=f"The {name} tool.")
    stop = asyncio.Event()
    serving = asyncio.create_task(
        serve_http(mcp.streamable_http_app(), host="127.0.0.1", port=port, stop=stop, grace=0.5)
    )
    try:
        yield
    finally:
        stop.set()
        await serving


async def test_the_client_reconnects_to_a_restarted_server_and_lists_its_tools() -> None:
    port = free_port()
    client = ReconnectingMcpClient(
        f"http://127.0.0.1:{port}/mcp", name="echo", backoff=FAST, connect_timeout=5.0
    )
    try:
        async with _server(port, ["alpha"]):
            await client.start()
            first = {t.name for t in client.tools}
            was_connected = client.connected
        # the server stopped; the client retries
        await eventually(
            lambda: not client.connected, timeout=WAIT, what="the client to notice the stop"
        )
        async with _server(port, ["alpha", "beta"]):
            await eventually(lambda: client.connects == 2, timeout=WAIT, what="the second connect")
            second = {t.name for t in client.tools}
            session = client.client
            assert session is not None
            called = await session.call_tool("beta", {})
    finally:
        await client.aclose()

    assert was_connected
    assert first == {"alpha"}
    assert second == {"alpha", "beta"}
    assert not called.is_error
    assert client.generation == 2


async def test_reconnect_attempts_share_one_tls_context(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[ssl.SSLContext] = []
    real = httpcore2.default_ssl_context

    def counting(**kwargs: bool) -> ssl.SSLContext:
        ctx = real(**kwargs)
        built.append(ctx)
        return ctx

    monkeypatch.setattr(httpcore2, "default_ssl_context", counting)
    tls_context.cache_clear()
    url = f"http://127.0.0.1:{free_port()}/mcp"  # nothing listens there
    client = ReconnectingMcpClient(url, name="nowhere", backoff=FAST, connect_timeout=2.0)
    try:
        await client.start()
        await eventually(lambda: client.attempts >= 4, timeout=WAIT, what="four connect attempts")
    finally:
        await client.aclose()

    assert not client.connected
    assert client.last_error is not None
    assert len(built) == 1
