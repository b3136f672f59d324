"""MCP tools: the official ``mcp`` client over streamable HTTP, through the sidecar.

The engine connects to ``{egress}/mcp/<mcpServerName>``; the sidecar forwards to the MCP
Registry entry's URL and adds the spec's headers and query parameters. One
:class:`McpConnection` per server is shared by every runtime context that uses the server
unchanged (a prompt edit does not reconnect); it is closed when the last context using it
is released.

The session is the shared :class:`specmesh.mcp_client.ReconnectingMcpClient`: it connects,
lists the tools, then follows ``tools/list_changed`` (a ``subscriptions/listen`` stream on
2026-07-28 servers, the notification on older ones) and lists them again. When the server
cannot be reached it reconnects with the project's backoff; meanwhile the server offers no
tools and calls fail with a tool error, never the turn.

:func:`mcp_tools` turns a connection's tools into :class:`McpTool` s for one context:
filtered by the spec's ``allowedTools`` and named ``<server>__<tool>`` so two servers'
tools cannot collide.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx2
import mcp_types
from mcp import MCPError
from pydantic import ValidationError

from specmesh.backoff import BackoffPolicy
from specmesh.mcp_client import ReconnectingMcpClient, describe_error
from specmesh.spec.models import McpServerRef

from ..errors import ToolError, ToolTimeoutError
from . import ToolCallContext, ToolDefinition, tool_name

__all__ = ["McpConnection", "McpTool", "mcp_tools"]

_MODERN = "2026-"  # protocol versions from 2026-07-28 on use subscriptions/listen


class McpConnection:
    """One MCP server reached through the sidecar, with its current tool list.

    The session is :class:`specmesh.mcp_client.ReconnectingMcpClient` (shared with the stdio
    bridge); this adds what the engine needs: no tools while disconnected, and a call's
    errors as :class:`engine.errors.ToolError` for the model.
    """

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
        self._session = ReconnectingMcpClient(
            url,
            name=server,
            connect_timeout=connect_timeout,
            backoff=BackoffPolicy(initial=initial_backoff, maximum=max_backoff),
        )

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start connecting; return once the first attempt succeeded or failed."""
        await self._session.start()

    async def aclose(self) -> None:
        """Disconnect and stop the connection's task."""
        await self._session.aclose()

    async def wait_closed(self) -> None:
        """Wait until the connection is closed (after :meth:`aclose`, by whoever)."""
        await self._session.wait_closed()

    @property
    def connected(self) -> bool:
        return self._session.connected

    @property
    def tools(self) -> tuple[mcp_types.Tool, ...]:
        """The server's tools as last listed (empty while disconnected)."""
        return self._session.tools if self._session.connected else ()

    @property
    def generation(self) -> int:
        """Grows each time the tool list changes."""
        return self._session.generation

    @property
    def connects(self) -> int:
        """Successful handshakes so far."""
        return self._session.connects

    @property
    def last_error(self) -> str | None:
        return self._session.last_error

    # ------------------------------------------------------------ calls

    async def call(self, tool: str, arguments: Mapping[str, Any], *, timeout: float) -> str:
        """Call one of the server's tools; raise ToolError with a message for the model."""
        client = self._session.client
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
            raise ToolError(
                tool=display, reason=f"tool {display} failed: {describe_error(e)}"
            ) from e
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
