"""What an MCP server really offers: connect with the official ``mcp`` client and list
its tools (for the MCP Registry view)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from mcp import Client

from control_plane.errors import BadRequestError

__all__ = ["list_mcp_tools"]


async def list_mcp_tools(
    url: str, headers: Mapping[str, str], *, timeout: float = 10.0
) -> list[dict[str, Any]]:
    """``[{name, description, inputSchema}]`` of the server at ``url``."""
    try:
        async with asyncio.timeout(timeout):
            async with Client(url) as client:
                result = await client.list_tools()
    except TimeoutError as e:
        raise BadRequestError(f"MCP server at {url} did not answer within {timeout:g}s") from e
    except Exception as e:  # any failure of the server is a fact to report, not a 500
        raise BadRequestError(
            f"MCP server at {url} could not be reached or listed: {type(e).__name__}"
        ) from e
    return [
        {"name": t.name, "description": t.description or "", "inputSchema": t.input_schema}
        for t in result.tools
    ]
