"""Integral numbers go out as JSON integers on the engine's HTTP responses.

A2A 1.0 carries metadata (the answer artifact's ``revision`` and ``usage``, a failure's
``revision``) in a protobuf ``Struct``, whose only number type is a double; the a2a-sdk
renders it with ``MessageToDict``, so ``{"revision": 1}`` would reach a JSON client as
``{"revision": 1.0}``. :class:`IntegralNumbersMiddleware` rewrites the JSON the app sends
-- whole ``application/json`` (and ``application/*+json``) bodies, and each ``data:``
line of a ``text/event-stream`` -- so that a number with no fractional part within the
exactly representable range (``|n| <= 2**53``) is written as an integer. JSON draws no
line between ``1`` and ``1.0``, so a value never changes, only how it is spelled: a
citation ``score`` of exactly 1 is written ``1`` too.

The gRPC binding has no such spelling: a gRPC client (and any client that parses the
JSON back into the protobuf types) sees the ``Struct``'s doubles.

A body sent compressed, a ``data:`` line that is not one JSON document, or a body that
is not JSON at all passes through untouched.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["IntegralNumbersMiddleware", "integral_json"]

_MAX_EXACT = 2**53
_DATA = b"data:"


def _number(text: str) -> float | int:
    value = float(text)
    if value.is_integer() and abs(value) <= _MAX_EXACT:
        return int(value)
    return value


def integral_json(body: bytes) -> bytes | None:
    """``body`` re-encoded with integral numbers as integers; ``None`` when it is not JSON
    or already has none written as a fraction (send it as it is)."""
    changed = False

    def number(text: str) -> float | int:
        nonlocal changed
        value = _number(text)
        changed = changed or isinstance(value, int)
        return value

    try:
        document: Any = json.loads(body, parse_float=number)
    except (ValueError, UnicodeDecodeError):
        return None
    if not changed:
        return None
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


def _event_chunk(chunk: bytes) -> bytes:
    """One server-sent-events chunk with each ``data:`` line rewritten."""
    if _DATA not in chunk:
        return chunk
    out: list[bytes] = []
    for line in chunk.splitlines(keepends=True):
        if line.startswith(_DATA):
            content = line.rstrip(b"\r\n")
            ending = line[len(content) :]
            rewritten = integral_json(content[len(_DATA) :])
            if rewritten is not None:
                line = _DATA + b" " + rewritten + ending
        out.append(line)
    return b"".join(out)


def _header(message: Message, name: bytes) -> bytes | None:
    for key, value in message.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return None


def _is_json(content_type: bytes) -> bool:
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (
        media.startswith(b"application/") and media.endswith(b"+json")
    )


class IntegralNumbersMiddleware:
    """ASGI middleware writing integral numbers of JSON and SSE responses as integers."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        mode = "pass"
        start: Message | None = None
        body: list[bytes] = []

        async def rewriting_send(message: Message) -> None:
            nonlocal mode, start
            if message["type"] == "http.response.start":
                content_type = _header(message, b"content-type") or b""
                if _header(message, b"content-encoding") is not None:
                    mode = "pass"
                elif _is_json(content_type):
                    mode, start = "json", message
                    return  # held until the body is complete (its length may change)
                elif content_type.lower().startswith(b"text/event-stream"):
                    mode = "sse"
                await send(message)
                return
            if message["type"] != "http.response.body" or mode == "pass":
                await send(message)
                return
            if mode == "sse":
                await send({**message, "body": _event_chunk(message.get("body", b""))})
                return
            body.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            assert start is not None
            whole = b"".join(body)
            rewritten = integral_json(whole)
            if rewritten is not None:
                whole = rewritten
                headers = [
                    (k, v) for k, v in start.get("headers", ()) if k.lower() != b"content-length"
                ]
                headers.append((b"content-length", str(len(whole)).encode()))
                start = {**start, "headers": headers}
            await send(start)
            await send({"type": "http.response.body", "body": whole, "more_body": False})

        await self._app(scope, receive, rewriting_send)
