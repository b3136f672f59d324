"""Serving an ASGI app from a process that owns its signals (the engine, the MCP bridge)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn

__all__ = ["QuietUvicornServer", "bind_tcp"]


_DATE_TICK = 1.0
"""Seconds between two updates of the ``Date`` header (uvicorn's own resolution)."""


class QuietUvicornServer(uvicorn.Server):
    """uvicorn without its own signal handling: the entry point owns SIGTERM/SIGINT.

    Nor its 10 Hz tick: at rest it wakes once a second (the ``Date`` header), and setting
    ``should_exit`` wakes it at once. sse-starlette's shutdown watcher, which polls twice
    a second per event loop for a uvicorn stopped by a signal, is not started: this server
    takes no signal, so it could never fire (streams end with the server's drain).
    """

    def __init__(self, config: uvicorn.Config) -> None:
        self._should_exit = False
        self._tick: asyncio.Future[None] | None = None
        super().__init__(config)

    @property
    def should_exit(self) -> bool:
        return self._should_exit

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self._should_exit = value
        if value and self._tick is not None and not self._tick.done():
            self._tick.set_result(None)  # the main loop looks now

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def main_loop(self) -> None:
        _skip_sse_shutdown_watcher()
        loop = asyncio.get_running_loop()
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 10) % 864000  # on_tick refreshes the Date at multiples of 10
            # asyncio.sleep's own mechanism, with a future should_exit can resolve early
            self._tick = loop.create_future()
            timer = loop.call_later(_DATE_TICK, _resolve, self._tick)
            try:
                await self._tick
            finally:
                timer.cancel()
                self._tick = None


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _skip_sse_shutdown_watcher() -> None:
    """Mark sse-starlette's per-loop shutdown watcher as started, so that none starts on
    this loop (it looks for ``AppStatus.should_exit``, which nothing here sets, or for a
    uvicorn server behind the SIGTERM handler, which this one is not)."""
    try:
        from sse_starlette import sse
    except ImportError:
        return
    state = getattr(sse, "_get_shutdown_state", None)
    if state is not None:
        state().watcher_started = True


def bind_tcp(host: str, port: int) -> socket.socket:
    """A listening, non-blocking TCP socket (IPv6 when ``host`` holds a ':')."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say they are
    # TCP; without it a response written in two parts waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.setblocking(False)
    return sock
