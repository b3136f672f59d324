"""Serve an ASGI app (an MCP server, an A2A partner) with uvicorn on loopback, in-process."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn

from tests.polling import eventually

__all__ = ["free_socket", "serve_asgi"]


def free_socket() -> socket.socket:
    """A loopback socket bound to a free port (the server listens on it, no race)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@asynccontextmanager
async def serve_asgi(app: Any, *, sock: socket.socket | None = None) -> AsyncIterator[str]:
    """Serve ``app`` until the block ends; yields its base URL."""
    sock = sock or free_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=1)
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))

    def started() -> bool:
        if task.done():
            task.result()  # raises the server's error
        return bool(server.started)

    await eventually(started, timeout=20, what="the ASGI server to start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()
