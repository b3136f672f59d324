"""engine.json_numbers: integral numbers written as JSON integers, nothing else changed."""

from __future__ import annotations

import json
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from engine.json_numbers import IntegralNumbersMiddleware, integral_json


def test_integral_doubles_become_integers_and_fractions_stay() -> None:
    body = b'{"revision": 1.0, "usage": {"totalTokens": 12.0}, "score": 0.25, "big": 1e300}'

    rewritten = integral_json(body)

    assert rewritten is not None
    document = json.loads(rewritten)
    assert document == {"revision": 1, "usage": {"totalTokens": 12}, "score": 0.25, "big": 1e300}
    assert type(document["revision"]) is int and type(document["big"]) is float


def test_strings_are_not_touched() -> None:
    rewritten = integral_json(b'{"promptVersion": "1.0", "n": 2.0, "text": "\xc3\xa9 1.0"}')

    assert rewritten is not None
    assert json.loads(rewritten) == {"promptVersion": "1.0", "n": 2, "text": "é 1.0"}


def test_nothing_to_rewrite_or_not_json_gives_none() -> None:
    assert integral_json(b'{"revision": 1, "score": 0.5}') is None
    assert integral_json(b"not json") is None
    assert integral_json(b"") is None


def _app() -> Starlette:
    async def unary(_: Request) -> Response:
        return JSONResponse({"metadata": {"revision": 1.0}, "text": "ok"})

    async def stream(_: Request) -> Response:
        events = 'event: x\r\ndata: {"revision": 3.0}\r\n\r\n: ping\r\n\r\ndata: [1.5\r\n\r\n'
        return Response(events, media_type="text/event-stream")

    async def text(_: Request) -> Response:
        return PlainTextResponse("revision 1.0")

    return Starlette(
        routes=[Route("/unary", unary), Route("/stream", stream), Route("/text", text)],
    )


async def _get(path: str) -> httpx.Response:
    app = IntegralNumbersMiddleware(_app())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://engine") as client:
        return await client.get(path)


async def test_middleware_rewrites_json_bodies_and_fixes_their_length() -> None:
    response = await _get("/unary")

    body: Any = json.loads(response.content)
    assert type(body["metadata"]["revision"]) is int
    assert response.headers["content-length"] == str(len(response.content))


async def test_middleware_rewrites_event_stream_data_lines_only() -> None:
    response = await _get("/stream")

    assert response.text == (
        'event: x\r\ndata: {"revision":3}\r\n\r\n: ping\r\n\r\ndata: [1.5\r\n\r\n'
    )


async def test_middleware_leaves_other_bodies_alone() -> None:
    assert (await _get("/text")).text == "revision 1.0"
