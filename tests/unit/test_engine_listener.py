"""The engine's listener is a TCP socket asyncio can set TCP_NODELAY on (without it every
kept-alive response waited ~40 ms for a delayed ACK; the figure lives in bench/)."""

from __future__ import annotations

import socket

from specmesh.uvicorn_server import bind_tcp


def test_listener_is_declared_tcp_so_nagle_gets_turned_off() -> None:
    sock = bind_tcp("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()
