"""Relaying an upstream HTTP response to the downstream caller as it arrives (shared by
the egress and the inbound), without hop-by-hop headers."""

from __future__ import annotations

import logging

import aiohttp
from aiohttp import web

__all__ = ["HOP_BY_HOP", "end_to_end_headers", "relay"]

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
