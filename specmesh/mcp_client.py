"""One MCP server kept connected: the official client, reopened with backoff.

Used by the engine (an MCP server behind its sidecar, streamable HTTP; the engine imports
this module only when a spec names MCP servers) and by ``specmesh mcp-bridge`` (a
stdio-only server run as a child)::

    ReconnectingMcpClient --connect--> mcp.Client(transport) --initialize--> server
         |  tools (paged tools/list)                 |
         |  <- tools/list_changed, prompts/resources list changes
         |     (subscriptions/listen on 2026-07-28 servers, notifications before)
         +-- the connection ends (error, stream lost, stdio child's stdout at EOF):
             wait (specmesh.backoff) and connect again

The connection lives in its own task: the client's transport holds a task group that one
task must enter and leave. Entering the client (``async with``, or :meth:`start`) starts the
task and returns once the first attempt succeeded or failed (bounded by
``connect_timeout``); leaving stops it. The handshake and every tool listing are bounded by
``connect_timeout``. The backoff starts again from its first delay once a connection stayed
up for the policy's healthy period, so a server that accepts and drops at once keeps
backing off.

Transports: a URL is reached over streamable HTTP with one TLS context per CA bundle for the
whole process (a reconnect does not load the CA file again); a
:class:`mcp.StdioServerParameters` starts the command and notices when its stdout ends.

What the client does not do: hide the tools while disconnected (:attr:`tools` is the last
list; callers that must offer nothing then check :attr:`connected`), or turn a call's errors
into anything (callers map ``MCPError`` and transport errors at their own boundary).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any, TextIO

import anyio
import httpx2
import mcp_types
from mcp import Client, MCPError, StdioServerParameters, stdio_client
from mcp.client._transport import TransportStreams
from mcp.client.streamable_http import streamable_http_client
from mcp.client.subscriptions import ListenNotSupportedError, SubscriptionLost
from mcp.server.subscriptions import (
    PromptsListChanged,
    ResourcesListChanged,
    ServerEvent,
    ToolsListChanged,
)
from mcp.shared.message import SessionMessage

from specmesh.backoff import BackoffPolicy, Reconnect

__all__ = ["DEFAULT_BACKOFF", "ReconnectingMcpClient", "describe_error", "tls_context"]

logger = logging.getLogger(__name__)

DEFAULT_BACKOFF = BackoffPolicy(initial=0.2, maximum=5.0)
"""Reconnect waits: 0.2 s doubling to 5 s (plus jitter)."""

_MODERN = "2026-"  # protocol versions from 2026-07-28 on deliver changes on subscriptions/listen
_HTTP_TIMEOUT = httpx2.Timeout(30.0, read=300.0)  # the SDK's defaults: a response may stream


@functools.cache
def tls_context(ca_bundle: str | None = None) -> ssl.SSLContext:
    """The TLS context for ``ca_bundle`` (None: the system's), built once per process."""
    if ca_bundle is None:
        return httpx2.create_ssl_context()
    return ssl.create_default_context(cafile=ca_bundle)


class ReconnectingMcpClient:
    """One MCP server kept connected, with its current tool list.

    ``server`` is the streamable-HTTP URL or the stdio command. ``on_tools_changed`` is
    awaited after the tool list changed; ``on_changed`` receives prompt and resource list
    changes. ``name`` names the server in logs.
    """

    def __init__(
        self,
        server: str | StdioServerParameters,
        *,
        name: str,
        ca_bundle: str | None = None,
        connect_timeout: float = 10.0,
        backoff: BackoffPolicy = DEFAULT_BACKOFF,
        on_tools_changed: Callable[[], Awaitable[None]] | None = None,
        on_changed: Callable[[ServerEvent], Awaitable[None]] | None = None,
        errlog: TextIO = sys.stderr,
    ) -> None:
        self.server = server
        self.name = name
        self._ca_bundle = ca_bundle
        self._connect_timeout = connect_timeout
        self._backoff = backoff
        self._on_tools_changed = on_tools_changed
        self._on_changed = on_changed
        self._errlog = errlog
        self._client: Client | None = None
        self._tools: tuple[mcp_types.Tool, ...] = ()
        self._ready = asyncio.Event()
        self._first_attempt = asyncio.Event()
        self._closing = asyncio.Event()
        self._refresh_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.attempts = 0
        """Connection attempts so far (successful or not)."""
        self.connects = 0
        """Successful handshakes so far (1 + reconnects)."""
        self.generation = 0
        """Grows each time the tool list changes."""
        self.server_info: mcp_types.Implementation | None = None
        """How the server identified itself (at the last handshake; None before the first)."""
        self.capabilities: mcp_types.ServerCapabilities | None = None
        """What the server declared it offers (at the last handshake)."""
        self.instructions: str | None = None
        self.last_error: str | None = None
        """Why the last connection failed or ended; None while connected."""

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start connecting; return once the first attempt succeeded or failed."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"mcp:{self.name}")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._connect_timeout):
                await self._first_attempt.wait()

    async def aclose(self) -> None:
        """Disconnect and stop the connection's task."""
        self._closing.set()
        for t in list(self._background):
            t.cancel()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({self._task})
        self._client = None

    async def wait_closed(self) -> None:
        """Wait until the connection's task ended (after :meth:`aclose`, by whoever)."""
        if self._task is not None:
            await asyncio.wait({self._task})

    async def __aenter__(self) -> ReconnectingMcpClient:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # ------------------------------------------------------------ state

    @property
    def connected(self) -> bool:
        return self._client is not None

    @property
    def client(self) -> Client | None:
        """The live session, None while disconnected."""
        return self._client

    @property
    def tools(self) -> tuple[mcp_types.Tool, ...]:
        """The tools as last listed (kept while reconnecting)."""
        return self._tools

    async def wait_connected(self, timeout: float) -> Client | None:
        """The session once connected (waiting at most ``timeout`` seconds), else None."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._ready.wait()
        return self._client

    # ------------------------------------------------------------ connection task

    def _transport(self, ended: asyncio.Event) -> contextlib.AbstractAsyncContextManager[Any]:
        if isinstance(self.server, StdioServerParameters):
            return _eof_watching_stdio(self.server, ended, self._errlog)
        return _http_transport(self.server, tls_context(self._ca_bundle))

    async def _run(self) -> None:
        reconnect = Reconnect(self._backoff)
        while not self._closing.is_set():
            ended = asyncio.Event()
            self.attempts += 1
            try:
                async with contextlib.AsyncExitStack() as stack:
                    async with asyncio.timeout(self._connect_timeout):
                        client = await stack.enter_async_context(
                            Client(
                                self._transport(ended),
                                message_handler=self._on_message,
                                cache=None,
                            )
                        )
                        self.server_info = client.server_info
                        self.capabilities = client.server_capabilities
                        self.instructions = client.instructions
                        await self._list_tools(client)
                    self._client = client
                    self._ready.set()
                    self.connects += 1
                    self.last_error = None
                    reconnect.connected()
                    info = client.server_info
                    logger.info(
                        "MCP server connected",
                        extra={
                            "mcp_server": self.name,
                            "tools": len(self._tools),
                            "protocol": client.protocol_version,
                            "server": info.name if info else None,
                            "version": info.version if info else None,
                            "connects": self.connects,
                        },
                    )
                    self._first_attempt.set()
                    await self._follow(client, ended)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # top of the connection task: log, back off, reconnect
                self.last_error = describe_error(e)
            finally:
                self._client = None
                self._ready.clear()
                self._first_attempt.set()
            if self._closing.is_set():
                return
            self.last_error = self.last_error or "the connection ended"
            delay = reconnect.next_delay()
            logger.warning(
                "MCP server %s down (%s); reconnecting in %.1f s",
                self.name,
                self.last_error,
                delay,
                extra={"mcp_server": self.name, "retry_in": delay},
            )
            await reconnect.wait(delay, stop=self._closing)

    async def _follow(self, client: Client, ended: asyncio.Event) -> None:
        """Return when the connection ends or the client closes; relist on changes.

        Raises when the change subscription is lost (then the task reconnects).
        """
        stops = {asyncio.create_task(ended.wait()), asyncio.create_task(self._closing.wait())}
        listener: asyncio.Task[None] | None = None
        if client.protocol_version.startswith(_MODERN):
            listener = asyncio.create_task(self._listen(client))
        waits = stops | ({listener} if listener is not None else set())
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if listener is not None and listener in done and not done & stops:
                if not ended.is_set():
                    listener.result()  # a lost subscription raises: reconnect
                await asyncio.wait(stops, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in waits:
                t.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    async def _listen(self, client: Client) -> None:
        """Relist on each tool list change and pass prompt and resource list changes on;
        return if the server does not serve ``subscriptions/listen`` (its lists are fixed)."""
        caps = client.server_capabilities
        try:
            async with client.listen(
                tools_list_changed=True,
                prompts_list_changed=self._on_changed is not None and caps.prompts is not None,
                resources_list_changed=self._on_changed is not None and caps.resources is not None,
            ) as sub:
                async for event in sub:
                    if isinstance(event, ToolsListChanged):
                        await self._list_tools(client)
                    elif self._on_changed is not None:
                        await self._on_changed(event)
        except SubscriptionLost:
            raise
        except (ListenNotSupportedError, MCPError):
            return

    async def _on_message(self, message: Any) -> None:
        """Notifications of handshake-era servers (newer ones use the subscription)."""
        client = self._client
        if client is None or client.protocol_version.startswith(_MODERN):
            return
        work: Awaitable[None] | None = None
        if isinstance(message, mcp_types.ToolListChangedNotification):
            work = self._relist(client)
        elif self._on_changed is not None:
            if isinstance(message, mcp_types.PromptListChangedNotification):
                work = self._on_changed(PromptsListChanged())
            elif isinstance(message, mcp_types.ResourceListChangedNotification):
                work = self._on_changed(ResourcesListChanged())
        if work is not None:
            task = asyncio.create_task(_run_awaitable(work))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _relist(self, client: Client) -> None:
        try:
            await self._list_tools(client)
        except (MCPError, OSError, TimeoutError, httpx2.HTTPError) as e:  # the task will notice
            logger.warning(
                "relisting MCP server %s's tools failed: %s", self.name, describe_error(e)
            )

    async def _list_tools(self, client: Client) -> None:
        async with self._refresh_lock:
            tools: list[mcp_types.Tool] = []
            cursor: str | None = None
            async with asyncio.timeout(self._connect_timeout):
                while True:
                    page = await client.list_tools(cursor=cursor)
                    tools.extend(page.tools)
                    if not (cursor := page.next_cursor):
                        break
            new = tuple(tools)
            if new == self._tools:
                return
            self._tools = new
            self.generation += 1
        logger.info("MCP server %s lists %d tools", self.name, len(new))
        if self._on_tools_changed is not None:
            await self._on_tools_changed()


def describe_error(e: BaseException) -> str:
    """``Type: message`` of an error (each one of a group), for logs and tool errors."""
    if isinstance(e, BaseExceptionGroup):
        return "; ".join(describe_error(x) for x in e.exceptions)
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


async def _run_awaitable(work: Awaitable[None]) -> None:
    await work


# ---------------------------------------------------------------- transports


@contextlib.asynccontextmanager
async def _http_transport(url: str, tls: ssl.SSLContext) -> AsyncIterator[TransportStreams]:
    """Streamable HTTP with a shared TLS context (the SDK's default client builds one per
    connection, reading the CA file each time)."""
    async with (
        httpx2.AsyncClient(verify=tls, timeout=_HTTP_TIMEOUT) as http,
        streamable_http_client(url, http_client=http) as streams,
    ):
        yield streams


class _EofWatchingReadStream:
    """The stdio transport's read stream, setting ``ended`` at EOF (the child exited)."""

    def __init__(self, inner: Any, ended: asyncio.Event) -> None:
        self._inner = inner
        self._ended = ended

    async def receive(self) -> SessionMessage | Exception:
        try:
            item: SessionMessage | Exception = await self._inner.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            self._ended.set()
            raise
        return item

    async def aclose(self) -> None:
        await self._inner.aclose()

    def __aiter__(self) -> _EofWatchingReadStream:
        return self

    async def __anext__(self) -> SessionMessage | Exception:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> _EofWatchingReadStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


@contextlib.asynccontextmanager
async def _eof_watching_stdio(
    params: StdioServerParameters, ended: asyncio.Event, errlog: TextIO
) -> AsyncIterator[TransportStreams]:
    """The SDK's stdio transport, telling ``ended`` when the child's stdout closes."""
    async with stdio_client(params, errlog=errlog) as (read, write):
        yield _EofWatchingReadStream(read, ended), write
