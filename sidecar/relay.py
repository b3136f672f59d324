"""Relaying an upstream HTTP response to the downstream caller as it arrives (shared by
the egress, the inbound and the entry), without hop-by-hop headers; and
:class:`RelayListener`, the life of such an HTTP proxy listener."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Self

import aiohttp
from aiohttp import web
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

__all__ = ["HOP_BY_HOP", "RelayListener", "end_to_end_headers", "relay", "traced"]

logger = logging.getLogger(__name__)

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
"""Headers that belong to one connection and are never forwarded (RFC 9110 §7.6.1)."""


def end_to_end_headers(headers: aiohttp.typedefs.LooseHeaders) -> list[tuple[str, str]]:
    """``headers`` without the hop-by-hop ones, nor those the ``Connection`` header lists."""
    items = list(headers.items()) if hasattr(headers, "items") else list(headers)
    listed = {
        h.strip().lower()
        for k, v in items
        if str(k).lower() == "connection"
        for h in str(v).split(",")
        if h.strip()
    }
    return [
        (str(k), str(v))
        for k, v in items
        if str(k).lower() not in HOP_BY_HOP and str(k).lower() not in listed
    ]


async def relay(
    request: web.Request, upstream: aiohttp.ClientResponse, *, downstream: str
) -> web.StreamResponse:
    """Stream ``upstream`` to ``request``'s caller chunk by chunk, then release it."""
    try:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for key, value in end_to_end_headers(upstream.headers):
            response.headers.add(key, value)
        if upstream.content_length is not None and "Content-Encoding" not in upstream.headers:
            response.content_length = upstream.content_length
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
        except (aiohttp.ClientError, TimeoutError) as e:
            # Headers are sent: the only honest signal left is to cut the connection.
            logger.warning("upstream stream broke (%s); closing the %s's connection", e, downstream)
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        return response
    finally:
        upstream.release()


async def traced(
    tracer: trace.Tracer,
    name: str,
    request: web.Request,
    forward: Callable[[web.Request, trace.Span], Awaitable[web.StreamResponse]],
) -> web.StreamResponse:
    """One relayed call as a SERVER span ``name`` continuing the caller's trace (W3C
    headers): method and status recorded, a 5xx marks it failed."""
    parent = propagate.extract(request.headers)
    with tracer.start_as_current_span(name, context=parent, kind=SpanKind.SERVER) as span:
        span.set_attribute("http.request.method", request.method)
        response = await forward(request, span)
        span.set_attribute("http.response.status_code", response.status)
        if response.status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        return response


class RelayListener:
    """An aiohttp listener that relays every request (``_handle``) over one pooled client
    session to its upstreams: the egress, the inbound and the entry. An async context
    manager; ``port`` 0 picks a free port, read back after :meth:`start`."""

    def __init__(self, *, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self._handle)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    def _connector(self) -> aiohttp.TCPConnector:
        """The upstream pool (no limit by default)."""
        return aiohttp.TCPConnector(limit=0)

    def _server_ssl(self) -> ssl.SSLContext | None:
        """TLS of the listener itself (``None``: plaintext)."""
        return None

    @property
    def secure(self) -> bool:
        """Whether the listener speaks TLS (``_server_ssl`` gives a context)."""
        return False

    @property
    def url(self) -> str:
        scheme = "https" if self.secure else "http"
        return f"{scheme}://{self.host}:{self.port}"

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=self._connector(), auto_decompress=False, trust_env=False
        )
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self._server_ssl())
        await site.start()
        server = site._server
        if server is not None and self.port == 0:
            sockets = getattr(server, "sockets", None) or []
            self.port = int(sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish, close the upstream pool."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None
