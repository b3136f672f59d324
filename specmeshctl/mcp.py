"""MCP servers: ``get mcpservers`` and ``get mcpserver NAME``, with the tools the control
plane last listed from each (a server is registered with ``apply -f``)."""

from __future__ import annotations

from typing import Any

from specmesh.errors import NotFoundError
from specmesh.protojson import message_json
from specmesh.v1 import control_plane_pb2 as pb
from specmeshctl.client import ControlPlaneClient, as_json, pages
from specmeshctl.errors import EXIT_OK
from specmeshctl.output import manifest, print_data, print_manifests, table

__all__ = ["get", "names"]


async def _servers(cp: ControlPlaneClient) -> dict[str, dict[str, Any]]:
    found = await pages(cp, cp.mcp.ListMcpServers, pb.ListMcpServersRequest(), "mcp_servers")
    return {s.name: message_json(s.spec) for s in found}


async def names(cp: ControlPlaneClient) -> list[str]:
    return list(await _servers(cp))


async def _listings(cp: ControlPlaneClient) -> dict[str, dict[str, Any]]:
    """Each server's tools as the control plane last listed them:
    ``{name: {tools: [names], refreshedAt, error, credentialsFrom}}``."""
    found = await pages(cp, cp.mcp.ListMcpToolListings, pb.ListMcpToolListingsRequest(), "listings")
    out: dict[str, dict[str, Any]] = {}
    for listing in found:
        data = as_json(listing)
        out[listing.mcp_server_name] = {
            "tools": [t.name for t in listing.tools],
            **{k: data.get(k) for k in ("refreshedAt", "error", "credentialsFrom")},
        }
    return out


def _tools_cell(status: dict[str, Any] | None) -> str:
    if status is None:
        return "-"
    return str(len(status["tools"])) + (" (stale)" if status.get("error") else "")


async def get(cp: ControlPlaneClient, name: str | None, output: str) -> int:
    servers = await _servers(cp)
    if name:
        if name not in servers:
            raise NotFoundError(kind="MCP server", name=name)
        servers = {name: servers[name]}
    tools = await _listings(cp)
    if name and output != "table":
        print_manifests([manifest("McpServer", name, servers[name], tools.get(name))], output)
        return EXIT_OK
    if output != "table":
        print_data(
            {n: {**s, **({"status": tools[n]} if n in tools else {})} for n, s in servers.items()},
            output,
        )
        return EXIT_OK
    table(
        [
            [n, str(s.get("transport", "")), str(s.get("url", "")), _tools_cell(tools.get(n)),
             (tools.get(n) or {}).get("error") or "-"]
            for n, s in sorted(servers.items())
        ],
        ["NAME", "TRANSPORT", "URL", "TOOLS", "LAST ERROR"],
    )  # fmt: skip
    return EXIT_OK
