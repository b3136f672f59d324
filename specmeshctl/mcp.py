"""MCP servers: registering one (``apply -f`` of an McpServer manifest) and
``get mcpserver(s)``."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc

from specmesh.errors import NotFoundError
from specmesh.spec.manifest import LoadedManifest
from specmesh.v1 import control_plane_pb2 as pb
from specmeshctl.client import ControlPlaneClient, pages
from specmeshctl.errors import EXIT_OK, ControlPlaneError
from specmeshctl.output import manifest, print_data, print_manifests, table

__all__ = ["get", "names", "register"]


async def register(
    cp: ControlPlaneClient, m: LoadedManifest, doc: str, *, dry_run: bool
) -> dict[str, Any]:
    before = await _spec(cp, m.name)
    reply = await cp.call(
        cp.mcp.RegisterMcpServer, pb.RegisterMcpServerRequest(manifest_json=doc, dry_run=dry_run)
    )
    after = json.loads(reply.mcp_server.spec_json)
    return {"kind": "McpServer", "name": m.name, "changed": before != after}


async def _spec(cp: ControlPlaneClient, name: str) -> dict[str, Any] | None:
    try:
        reply = await cp.call(cp.mcp.GetMcpServer, pb.GetMcpServerRequest(mcp_server_name=name))
    except ControlPlaneError as e:
        if e.code == grpc.StatusCode.NOT_FOUND:
            return None
        raise
    spec: dict[str, Any] = json.loads(reply.mcp_server.spec_json)
    return spec


async def _servers(cp: ControlPlaneClient) -> dict[str, dict[str, Any]]:
    found = await pages(cp, cp.mcp.ListMcpServers, pb.ListMcpServersRequest(), "mcp_servers")
    return {s.name: json.loads(s.spec_json) for s in found}


async def names(cp: ControlPlaneClient) -> list[str]:
    return list(await _servers(cp))


async def _tools(cp: ControlPlaneClient, name: str) -> dict[str, Any]:
    """``{tools: [names]}`` as the control plane last listed them, or ``{error}``."""
    try:
        reply = await cp.call(
            cp.mcp.ListMcpServerTools, pb.ListMcpServerToolsRequest(mcp_server_name=name)
        )
    except ControlPlaneError as e:
        if e.code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            raise
        return {"tools": [], "error": e.message}
    return {"tools": [t.name for t in reply.tools]}


async def get(cp: ControlPlaneClient, name: str | None, output: str) -> int:
    servers = await _servers(cp)
    if name:
        if name not in servers:
            raise NotFoundError(kind="MCP server", name=name)
        servers = {name: servers[name]}
    listed = await asyncio.gather(*(_tools(cp, n) for n in servers))
    tools = dict(zip(servers, listed, strict=True))
    if name and output != "table":
        print_manifests([manifest("McpServer", name, servers[name], tools[name])], output)
        return EXIT_OK
    if output != "table":
        print_data({n: {**s, "status": tools[n]} for n, s in servers.items()}, output)
        return EXIT_OK
    table(
        [
            [n, str(s.get("transport", "")), str(s.get("url", "")),
             str(len(tools[n]["tools"])) if "error" not in tools[n] else "-",
             tools[n].get("error") or "-"]
            for n, s in sorted(servers.items())
        ],
        ["NAME", "TRANSPORT", "URL", "TOOLS", "LAST ERROR"],
    )  # fmt: skip
    return EXIT_OK
