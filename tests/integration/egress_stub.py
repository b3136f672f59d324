"""Test stand-ins shared by the engine integration tests: a pass-through egress (the
sidecar's ``/llm``, ``/mcp``, ``/a2a`` paths, stood in for by aiohttp) and an in-memory
span exporter on the global tracer provider."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Self

import aiohttp
from aiohttp import web
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


class StubEgress:
    """Serves ``_handle`` on a free local port; ``relay`` streams one request upstream."""

    handler_cancellation = False

    def __init__(self) -> None:
        self.url = ""
        self._session: aiohttp.ClientSession | None = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    async def relay(self, request: web.Request, target: str) -> web.StreamResponse:
        """Forward ``request`` to ``target`` and stream the answer back (502 if unreachable)."""
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        try:
            upstream = await self._session.request(
                request.method, target, headers=headers, data=await request.read()
            )
        except aiohttp.ClientError:
            return web.Response(status=502, text="upstream unreachable")
        async with upstream:
            response = web.StreamResponse(status=upstream.status)
            for k, v in upstream.headers.items():
                if k.lower() not in HOP_HEADERS:
                    response.headers[k] = v
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Self]:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(
            app,
            access_log=None,
            handler_cancellation=self.handler_cancellation,
            shutdown_timeout=1,
        )
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        self._session = aiohttp.ClientSession(auto_decompress=False)
        try:
            yield self
        finally:
            await self._session.close()
            await runner.cleanup()


def span_exporter() -> InMemorySpanExporter:
    """An exporter fed every span the global tracer provider finishes from now on."""
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter
