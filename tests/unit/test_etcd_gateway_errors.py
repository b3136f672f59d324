"""What the etcd client makes of the gateway's answers that a healthy etcd will not give on
demand (the real-etcd cases, stopped, frozen, compacted, are in
``integration/test_watch.py``): each maps to one error of :mod:`specmesh.errors`, and a
watch stream is framed by newlines, not by network chunks."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
from aiohttp import web

from specmesh.errors import StoreError, StoreUnavailableError
from specmesh.etcd import EtcdClient, WatchResponse
from specmesh.ports import free_port

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def _gateway(handler: Handler) -> AsyncIterator[EtcdClient]:
    app = web.Application()
    app.router.add_post("/v3/{path:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    client = EtcdClient(host="127.0.0.1", port=port, timeout=5)
    try:
        yield client
    finally:
        await client.close()
        await runner.cleanup()


def _answer(status: int, body: str) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, text=body, content_type="application/json")

    return handler


@pytest.mark.parametrize(
    ("status", "body", "error", "says"),
    [
        (503, '{"error":"etcdserver: leader changed","code":14}', StoreUnavailableError, "leader"),
        (504, "", StoreUnavailableError, "HTTP 504"),
        (
            400,
            '{"error":"etcdserver: mvcc: required revision has been compacted","code":11}',
            StoreError,
            "compacted",
        ),
        (500, "boom", StoreError, "HTTP 500: boom"),
        (200, "not json", StoreError, "invalid JSON"),
    ],
)
async def test_a_gateway_refusal_maps_to_one_store_error(
    status: int, body: str, error: type[StoreError], says: str
) -> None:
    async with _gateway(_answer(status, body)) as client:
        with pytest.raises(error, match=says) as caught:
            await client.put("/k", "v")
        if error is StoreError:
            assert not isinstance(caught.value, StoreUnavailableError)


async def test_nothing_listening_is_unavailable() -> None:
    client = EtcdClient(host="127.0.0.1", port=free_port(), timeout=5)
    with pytest.raises(StoreUnavailableError, match="/v3/kv/range"):
        await client.range("/k")
    await client.close()


def _event(key: str, revision: int) -> dict[str, object]:
    return {
        "kv": {
            "key": base64.b64encode(key.encode()).decode(),
            "value": base64.b64encode(b"v").decode(),
            "mod_revision": str(revision),
        }
    }


def _stream(*chunks: bytes) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for chunk in chunks:
            await response.write(chunk)
        await response.write_eof()
        return response

    return handler


async def test_watch_messages_are_framed_by_newlines_not_by_chunks() -> None:
    created = json.dumps({"result": {"header": {"revision": "4"}, "created": True}})
    events = json.dumps({"result": {"header": {"revision": "5"}, "events": [_event("/a", 5)]}})
    progress = json.dumps({"result": {"header": {"revision": "9"}}})  # no newline: last
    wire = f"{created}\n\n{events}\n{progress}".encode()
    halves = (wire[:7], wire[7:60], wire[60:])  # a message split over chunks, two in one
    async with _gateway(_stream(*halves)) as client:
        got = [m async for m in client.watch("/", prefix=True)]
    assert got == [
        WatchResponse(revision=4, created=True),
        WatchResponse(revision=5, events=got[1].events),
        WatchResponse(revision=9),
    ]
    assert [(e.key, e.mod_revision) for e in got[1].events] == [("/a", 5)]
    assert got[2].progress


@pytest.mark.parametrize(
    ("message", "error", "says"),
    [
        (
            {"error": {"grpc_code": 14, "http_code": 503, "message": "transport is closing"}},
            StoreUnavailableError,
            "transport is closing",
        ),
        (
            {"result": {"canceled": True, "cancel_reason": "permission denied"}},
            StoreError,
            "canceled the watch on /: permission denied",
        ),
    ],
)
async def test_a_watch_ended_by_etcd_raises_what_ended_it(
    message: dict[str, object], error: type[StoreError], says: str
) -> None:
    created = {"result": {"header": {"revision": "4"}, "created": True}}
    wire = f"{json.dumps(created)}\n{json.dumps(message)}\n".encode()
    async with _gateway(_stream(wire)) as client:
        seen: list[WatchResponse] = []
        with pytest.raises(error, match=says):
            async for m in client.watch("/", prefix=True):
                seen.append(m)
        assert [m.created for m in seen] == [True]
