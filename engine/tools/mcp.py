"""MCP tools: the official ``mcp`` client over streamable HTTP, through the sidecar.

The engine connects to ``{egress}/mcp/<mcpServerName>``; the sidecar forwards to the MCP
Registry entry's URL and adds the spec's headers and query parameters. One
:class:`McpConnection` per server is shared by every runtime context that uses the server
unchanged (a prompt edit does not reconnect); it is closed when the last context using it
is released.

A connection runs in its own task (the client's transport holds a task group that must
be entered and left by one task): it connects, lists the tools, then follows
``tools/list_changed`` (a ``subscriptions/listen`` stream on 2026-07-28 servers, the
notification on older ones) and lists them again. When the server cannot be reached the
task retries with backoff; meanwhile the server offers no tools and calls fail with a
tool error, never the turn.

:func:`mcp_tools` turns a connection's tools into :class:`McpTool` s for one context:
filtered by the spec's ``allowedTools`` and named ``<server>__<tool>`` so two servers'
tools cannot collide.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx2
import mcp_types
from mcp import Client, MCPError
from mcp.client.subscriptions import ListenNotSupportedError, SubscriptionLost
from pydantic import ValidationError

from specmesh.backoff import BackoffPolicy, Reconnect
from specmesh.spec.models import McpServerRef

from ..errors import ToolError, ToolTimeoutError
from . import ToolCallContext, ToolDefinition, tool_name

__all__ = ["McpConnection", "McpTool", "mcp_tools"]

logger = logging.getLogger(__name__)

_MODERN = "2026-"  # protocol versions from 2026-07-28 on use subscriptions/listen


class McpConnection:
    """One MCP server reached through the sidecar, with its current tool list."""

    def __init__(
        self,
        *,
        server: str,
        url: str,
        connect_timeout: float = 10.0,
        initial_backoff: float = 0.2,
        max_backoff: float = 5.0,
    ) -> None:
        self.server = server
        self.url = url
        self._connect_timeout = connect_timeout
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._client: Client | None = None
        self._tools: tuple[mcp_types.Tool, ...] = ()
        self._first_attempt = asyncio.Event()
        self._closing = asyncio.Event()
        self._refresh_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.generation = 0
        """Grows each time the tool list changes."""
        self.connects = 0
        """Successful handshakes so far."""
        self.last_error: str | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start connecting; return once the first attempt succeeded or failed."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"mcp:{self.server}")
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
                await self._task
        self._client = None

    async def wait_closed(self) -> None:
        """Wait until the connection is closed (after :meth:`aclose`, by whoever)."""
        if self._task is not None:
            await asyncio.wait({self._task})

    @property
    def connected(self) -> bool:
        return self._client is not None

    @property
    def tools(self) -> tuple[mcp_types.Tool, ...]:
        """The server's tools as last listed (empty while disconnected)."""
        return self._tools if self._client is not None else ()

    async def _run(self) -> None:
        reconnect = Reconnect(
            BackoffPolicy(initial=self._initial_backoff, maximum=self._max_backoff)
        )
        while not self._closing.is_set():
            try:
                async with Client(self.url, message_handler=self._on_message, cache=None) as client:
                    await self._list_tools(client)
                    self._client = client
                    self.connects += 1
                    self.last_error = None
                    reconnect.connected()
                    logger.info(
                        "MCP server %s connected (%d tools, protocol %s)",
                        self.server,
                        len(self._tools),
                        client.protocol_version,
                    )
                    self._first_attempt.set()
                    await self._follow(client)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # top of the connection task: log, back off, retry
                self.last_error = _describe(e)
            finally:
                self._client = None
                self._first_attempt.set()
            if self._closing.is_set():
                return
            delay = reconnect.next_delay()
            logger.warning(
                "MCP server %s unreachable (%s); retrying in %.1f s",
                self.server,
                self.last_error,
                delay,
            )
            await reconnect.wait(delay, stop=self._closing)

    async def _follow(self, client: Client) -> None:
        """Wait until closing, refreshing the tools on ``tools/list_changed``."""
        closing = asyncio.create_task(self._closing.wait())
        listener: asyncio.Task[None] | None = None
        try:
            if client.protocol_version.startswith(_MODERN):
                listener = asyncio.create_task(self._listen(client))
                await asyncio.wait({closing, listener}, return_when=asyncio.FIRST_COMPLETED)
                if listener.done() and not closing.done():
                    listener.result()  # raises SubscriptionLost -> reconnect
                    await closing
            else:
                await closing
        finally:
            closing.cancel()
            if listener is not None:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError, ListenNotSupportedError):
                    await listener

    async def _listen(self, client: Client) -> None:
        try:
            async with client.listen(tools_list_changed=True) as sub:
                async for _event in sub:
                    await self._list_tools(client)
        except ListenNotSupportedError:
            await self._closing.wait()
        except SubscriptionLost:
            raise
        else:
            await self._closing.wait()

    async def _on_message(self, message: Any) -> None:
        client = self._client
        if (
            isinstance(message, mcp_types.ToolListChangedNotification)
            and client is not None
            and not client.protocol_version.startswith(_MODERN)
        ):
            task = asyncio.create_task(self._list_tools(client))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _list_tools(self, client: Client) -> None:
        async with self._refresh_lock:
            tools: list[mcp_types.Tool] = []
            cursor: str | None = None
            async with asyncio.timeout(self._connect_timeout):
                while True:
                    page = await client.list_tools(cursor=cursor)
                    tools.extend(page.tools)
                    cursor = page.next_cursor
                    if not cursor:
                        break
            new = tuple(tools)
            if new != self._tools:
                self._tools = new
                self.generation += 1
                logger.info("MCP server %s lists %d tools", self.server, len(new))

    # ------------------------------------------------------------ calls

    async def call(self, tool: str, arguments: Mapping[str, Any], *, timeout: float) -> str:
        """Call one of the server's tools; raise ToolError with a message for the model."""
        client = self._client
        display = f"{self.server}/{tool}"
        if client is None:
            raise ToolError(
                tool=display, reason=f"MCP server {self.server!r} is not connected right now"
            )
        try:
            async with asyncio.timeout(timeout):
                result = await client.call_tool(tool, dict(arguments), read_timeout_seconds=timeout)
        except TimeoutError as e:
            raise ToolTimeoutError(tool=display, timeout=timeout) from e
        except MCPError as e:
            raise ToolError(tool=display, reason=f"tool {display} failed: {e}") from e
        except (httpx2.HTTPError, OSError, ValidationError) as e:
            raise ToolError(tool=display, reason=f"tool {display} failed: {_describe(e)}") from e
        text = _result_text(result.content, result.structured_content)
        if result.is_error:
            raise ToolError(tool=display, reason=text or f"tool {display} failed")
        return text


def _result_text(content: Sequence[Any], structured: Any) -> str:
    parts: list[str] = []
    for block in content:
        if isinstance(block, mcp_types.TextContent):
            parts.append(block.text)
        else:
            parts.append(f"[{getattr(block, 'type', 'content')}]")
    if not parts and structured is not None:
        parts.append(json.dumps(structured, ensure_ascii=False, default=str))
    return "\n".join(parts)


def _describe(e: BaseException) -> str:
    if isinstance(e, BaseExceptionGroup):
        return "; ".join(_describe(x) for x in e.exceptions)
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@dataclass(frozen=True)
class McpTool:
    """One MCP tool as the model sees it (namespaced) and how to call it."""

    connection: McpConnection
    remote_name: str
    definition: ToolDefinition
    kind: str = "mcp"

    async def call(self, arguments: Mapping[str, Any], *, context: ToolCallContext) -> str:
        return await self.connection.call(self.remote_name, arguments, timeout=context.timeout)


def mcp_tools(connection: McpConnection, ref: McpServerRef) -> list[McpTool]:
    """The connection's tools this spec allows, named ``<server>__<tool>``."""
    allowed = set(ref.allowed_tools) if ref.allowed_tools is not None else None
    out: list[McpTool] = []
    for t in connection.tools:
        if allowed is not None and t.name not in allowed:
            continue
        description = t.description or t.title or t.name
        schema = dict(t.input_schema) if t.input_schema else {"type": "object"}
        out.append(
            McpTool(
                connection=connection,
                remote_name=t.name,
                definition=ToolDefinition(
                    name=tool_name(ref.mcp_server_name, t.name),
                    description=description,
                    parameters=schema,
                ),
            )
        )
    return out
