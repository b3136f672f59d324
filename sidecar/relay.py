"""Relaying an upstream HTTP response to the downstream caller as it arrives (shared by
the egress, the inbound and the entry), without hop-by-hop headers; and
:class:`RelayListener`, the life of such an HTTP proxy listener."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, Self

import aiohttp
from aiohttp import web
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from .errors import PolicyError

if TYPE_CHECKING:
    from .engine_calls import EngineCalls

__all__ = [
    "HOP_BY_HOP",
    "RelayListener",
    "RelayTap",
    "active_tracer",
    "end_to_end_headers",
    "forward_to_engine",
    "relay",
    "traced",
]

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
    """``headers`` without the hop-by-hop ones, nor those the ``Connection`` header lists.

    One pass, each name lower-cased once (it runs two or three times per proxied request)."""
    items = headers.items() if hasattr(headers, "items") else headers
    out: list[tuple[str, str, str]] = []
    listed: set[str] | None = None
    for k, v in items:
        key = str(k)
        lower = key.lower()
        if lower in HOP_BY_HOP:
            if lower == "connection":
                listed = listed or set()
                listed.update(h.strip().lower() for h in str(v).split(",") if h.strip())
            continue
        out.append((key, lower, str(v)))
    if listed:
        return [(k, v) for k, lower, v in out if lower not in listed]
    return [(k, v) for k, _, v in out]


def active_tracer(explicit: trace.Tracer | None) -> trace.Tracer | None:
    """The tracer a listener records its spans with: the one it was given, else the global
    provider's -- or ``None`` while no provider is installed (tracing off: no span is made,
    and the W3C headers pass through untouched, as the no-op span would have left them).

    The entry point installs the provider before the listeners start; one installed later
    is seen within :data:`_RECHECK_SECONDS` (a provider, once set, is never replaced)."""
    if explicit is not None:
        return explicit
    global _global_tracer, _checked_at
    if _global_tracer is not None:
        return _global_tracer
    now = time.monotonic()
    if now - _checked_at < _RECHECK_SECONDS:
        return None
    _checked_at = now
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    _global_tracer = provider.get_tracer("specmesh.sidecar")
    return _global_tracer


_RECHECK_SECONDS = 1.0
_global_tracer: trace.Tracer | None = None
_checked_at = float("-inf")


class RelayTap(Protocol):
    """Sees an answer as :func:`relay` passes it on (:class:`sidecar.engine_calls.EngineCall`)."""

    broken: str | None
    """Set when the answer did not reach its end: ``timeout``, ``unreachable`` (the upstream
    broke it) or ``cancelled`` (the caller left)."""

    def begin_body(self, content_type: str) -> None: ...

    def feed(self, chunk: bytes) -> None: ...


async def relay(
    request: web.BaseRequest,
    upstream: aiohttp.ClientResponse,
    *,
    downstream: str,
    tap: RelayTap | None = None,
) -> web.StreamResponse:
    """Stream ``upstream`` to ``request``'s caller chunk by chunk, then release it; ``tap``
    sees each chunk after it was written.

    A caller that hangs up mid-response (a client that gave up, a load generator ending its
    run) is an expected event: logged at debug, the upstream connection closed (the upstream
    sees its call cancelled), and the response returned as it stands -- aiohttp drops it
    without writing anything more to the closed connection."""
    try:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.extend(end_to_end_headers(upstream.headers))
        if upstream.content_length is not None and "Content-Encoding" not in upstream.headers:
            response.content_length = upstream.content_length
        if tap is not None:
            tap.begin_body(upstream.headers.get("Content-Type", ""))
        try:
            await response.prepare(request)
            while True:
                try:
                    chunk = await upstream.content.readany()
                except (aiohttp.ClientError, TimeoutError) as e:
                    if tap is not None:
                        tap.broken = "timeout" if isinstance(e, TimeoutError) else "unreachable"
                    # Headers are sent: the only honest signal left is to cut the connection.
                    logger.warning(
                        "upstream stream broke (%s); closing the %s's connection", e, downstream
                    )
                    if request.transport is not None:
                        request.transport.close()
                    return response
                if not chunk:
                    break
                await response.write(chunk)
                if tap is not None:
                    tap.feed(chunk)
            await response.write_eof()
        except ConnectionError as e:  # writing to the caller: it hung up
            if tap is not None:
                tap.broken = "cancelled"
            logger.debug("the %s closed its connection mid-response (%s)", downstream, e)
            upstream.close()
        return response
    finally:
        upstream.release()


async def traced(
    tracer: trace.Tracer | None,
    name: str,
    request: web.BaseRequest,
    forward: Callable[[web.BaseRequest, trace.Span], Awaitable[web.StreamResponse]],
) -> web.StreamResponse:
    """One relayed call as a SERVER span ``name`` continuing the caller's trace (W3C
    headers): method and status recorded, a 5xx marks it failed. ``tracer`` None (tracing
    off, :func:`active_tracer`): no span is made, ``forward`` gets the invalid span (its
    setters do nothing)."""
    if tracer is None:
        return await forward(request, trace.INVALID_SPAN)
    parent = propagate.extract(request.headers)
    with tracer.start_as_current_span(name, context=parent, kind=SpanKind.SERVER) as span:
        span.set_attribute("http.request.method", request.method)
        response = await forward(request, span)
        span.set_attribute("http.response.status_code", response.status)
        if response.status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        return response


async def forward_to_engine(
    session: aiohttp.ClientSession,
    request: web.BaseRequest,
    headers: aiohttp.typedefs.LooseHeaders,
    body: bytes | None,
    engine_url: str,
    read_timeout: float,
    calls: EngineCalls | None = None,
) -> web.StreamResponse:
    """Send ``request`` on to the local engine at ``engine_url`` (same method, path and query;
    ``read_timeout`` seconds at most between two reads) and relay its answer to the caller; a
    503 ``ENGINE_UNREACHABLE`` when the engine does not answer. Shared by the inbound and the
    entry; the call is counted on ``calls`` (its revision, outcome and duration)."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=read_timeout)
    call = calls.begin_http(request.method, request.path, body) if calls is not None else None
    try:
        upstream = await session.request(
            request.method,
            engine_url + request.rel_url.raw_path_qs,
            headers=headers,
            data=body,
            allow_redirects=False,
            timeout=timeout,
        )
    except (aiohttp.ClientError, TimeoutError) as e:
        if call is not None:
            call.finish("timeout" if isinstance(e, TimeoutError) else "unreachable")
        return PolicyError(
            "ENGINE_UNREACHABLE", f"the engine is unreachable ({type(e).__name__})"
        ).http_response()
    try:
        return await relay(request, upstream, downstream="caller", tap=call)
    except asyncio.CancelledError:
        if call is not None:
            call.broken = "cancelled"
        raise
    finally:
        if call is not None:
            call.finish_http(upstream.status)


class RelayListener:
    """An aiohttp listener that relays every request (``_handle``) over one pooled client
    session to its upstreams: the egress, the inbound and the entry. An async context
    manager; ``port`` 0 picks a free port, read back after :meth:`start`."""

    def __init__(self, *, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.ServerRunner | None = None

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
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
        # aiohttp's low-level server: every request goes to ``_handle`` (no application,
        # router or middleware on the way: the listener relays whatever path it gets)
        self._runner = web.ServerRunner(
            web.Server(self._handle, access_log=None), handle_signals=False
        )
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
