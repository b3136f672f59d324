"""Two small MCP servers the integration tests run as real processes.

::

    python -m tests.integration.mcp_fixture_servers keyed --tools alpha,beta [--port 0]
    python -m tests.integration.mcp_fixture_servers notes

``keyed`` serves streamable HTTP at ``/mcp`` and answers 401 to any request whose
``X-Api-Key`` header is not ``$MCP_FIXTURE_KEY``; it logs ``mcp server serving`` with its
URL. ``notes`` speaks stdio and identifies itself as ``fixture-notes`` 3.1.4, with one
tool, one prompt, one resource and one resource template (what the bridge must pass on).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence

from mcp.server.mcpserver import MCPServer
from starlette.types import ASGIApp, Receive, Scope, Send

from specmesh.logs import configure_logging
from specmesh.mcpbridge import serve_http

NOTES_NAME, NOTES_VERSION = "fixture-notes", "3.1.4"


class _RequireKey:
    """401 for an HTTP request without the right ``X-Api-Key``."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and dict(scope["headers"]).get(b"x-api-key") != self.key:
            await send({"type": "http.response.start", "status": 401, "headers": []})
            await send({"type": "http.response.body", "body": b"missing or wrong X-Api-Key"})
            return
        await self.app(scope, receive, send)


def _keyed(tools: list[str]) -> MCPServer:
    server = MCPServer("keyed")
    for name in tools:
        server.add_tool(lambda: "ok", name=name, description=f"The {name} tool.")
    return server


def _notes() -> MCPServer:
    server = MCPServer(NOTES_NAME, version=NOTES_VERSION, instructions="Notes for tests.")

    @server.tool()
    def count_notes() -> int:
        """How many notes there are."""
        return 2

    @server.prompt()
    def summarize(topic: str) -> str:
        """Ask for a summary of the notes on a topic."""
        return f"Summarize the notes about {topic}."

    @server.resource("notes://all", name="all-notes", mime_type="text/plain")
    def all_notes() -> str:
        """Every note."""
        return "first note\nsecond note"

    @server.resource("notes://by-id/{note_id}", name="note")
    def note(note_id: str) -> str:
        """One note by id."""
        return f"note {note_id}"

    return server


async def _serve_keyed(tools: list[str], port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app = _RequireKey(_keyed(tools).streamable_http_app(), os.environ["MCP_FIXTURE_KEY"])
    await serve_http(app, host="127.0.0.1", port=port, stop=stop, grace=1.0)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.integration.mcp_fixture_servers")
    p.add_argument("kind", choices=["keyed", "notes"])
    p.add_argument("--tools", default="alpha")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    if args.kind == "notes":
        _notes().run()
        return 0
    configure_logging()
    asyncio.run(_serve_keyed(args.tools.split(","), args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
