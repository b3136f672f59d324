"""The peers ``bench/agent_a2a.py`` runs next to the agents, each as its own process:

* ``floor``: a bare a2a-sdk server (the project's a2a-sdk, no model): an ``AgentExecutor``
  that answers a fixed text, served by uvicorn -- the floor of an A2A agent server, and
  the partner agent of the tool-call workload;
* ``mcp``: a small MCP server (the project's ``mcp`` package) over streamable HTTP with
  one tool, ``lookup``.

Both count what they served at ``GET /_count`` (the bench checks that each turn of the
tool-call workload made one MCP call and one partner call). Run:
``python bench/_a2a_peers.py floor|mcp --port P [--name N]``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

FLOOR_ANSWER = "The scripted model answers at once, with a short answer of a few words."
LOOKUP_PREFIX = "value-of-"


def _count_route(counter: dict[str, int]) -> Any:
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def count(_: Request) -> JSONResponse:
        return JSONResponse(counter)

    return Route("/_count", count, methods=["GET"])


def _floor_app(name: str, port: int) -> Any:
    from a2a.helpers.proto_helpers import new_text_message
    from a2a.server.agent_execution import AgentExecutor, RequestContext
    from a2a.server.events.event_queue_v2 import EventQueue
    from a2a.server.request_handlers import DefaultRequestHandlerV2
    from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
    from a2a.server.tasks import InMemoryTaskStore
    from a2a.types.a2a_pb2 import (
        AgentCapabilities,
        AgentCard,
        AgentInterface,
        AgentSkill,
        Role,
    )
    from starlette.applications import Starlette

    counter = {"turns": 0}

    class FixedAnswer(AgentExecutor):
        async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
            counter["turns"] += 1
            await event_queue.enqueue_event(
                new_text_message(FLOOR_ANSWER, context_id=context.context_id, role=Role.ROLE_AGENT)
            )

        async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
            raise NotImplementedError

    card = AgentCard(
        name=name,
        description="Answers a fixed text, with no model.",
        version="1",
        supported_interfaces=[
            AgentInterface(
                protocol_binding="JSONRPC", url=f"http://127.0.0.1:{port}/", protocol_version="1.0"
            )
        ],
        capabilities=AgentCapabilities(streaming=False),
        default_input_modes=["text/plain"],
        default_output_modes=["text/plain"],
        skills=[AgentSkill(id="fixed", name="Fixed", description="A fixed answer.", tags=["x"])],
    )
    handler = DefaultRequestHandlerV2(
        agent_executor=FixedAnswer(), task_store=InMemoryTaskStore(), agent_card=card
    )
    return Starlette(
        routes=[
            _count_route(counter),
            *create_agent_card_routes(card),
            *create_jsonrpc_routes(handler, "/"),
        ]
    )


def _mcp_app() -> Any:
    from mcp.server.mcpserver import MCPServer

    counter = {"calls": 0}
    server = MCPServer("kb")

    @server.tool()
    def lookup(key: str) -> str:
        """Look a key up in the knowledge base."""
        counter["calls"] += 1
        return f"{LOOKUP_PREFIX}{key}"

    app = server.streamable_http_app()  # the MCP endpoint is /mcp
    app.router.routes.insert(0, _count_route(counter))
    return app


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["floor", "mcp"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="floor")
    args = parser.parse_args()
    import uvicorn

    app = _floor_app(args.name, args.port) if args.role == "floor" else _mcp_app()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
