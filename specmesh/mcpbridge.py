"""``specmesh mcp-bridge``: serve a stdio-only MCP server over streamable HTTP.

::

    specmesh mcp-bridge [--host H] [--port P] [--name N] [--pass-environment] -- COMMAND [ARGS...]

``mcp-proxy`` pins ``mcp<2`` and cannot share the project's environment, so the fleet
bridges third-party stdio servers (``mcp-server-time``) itself::

    HTTP client --/mcp--> Server (lowlevel, this process) --tools/call--> StdioUpstream
                                                          prompts/get     |  stdin/stdout
                                                          resources/read  v
                                                                    COMMAND [ARGS...]

:class:`StdioUpstream` owns the child: it spawns it with the official client's stdio
transport, lists its tools, follows its list changes and, when the child exits (its stdout
reaches EOF), starts it again with backoff -- all of that is
:class:`specmesh.mcp_client.ReconnectingMcpClient`, which the engine uses too.
:func:`bridge_server` builds the HTTP-facing server as the child presents itself: its
``serverInfo`` (name, version, title...), its instructions and the capabilities it declares.
Its handlers forward ``tools/list`` and ``tools/call`` and, when the child offers them,
``prompts/list``, ``prompts/get``, ``resources/list``, ``resources/templates/list`` and
``resources/read`` (pages and errors as the child answers them). A change of the child's
tool, prompt or resource list is published to ``subscriptions/listen`` streams (2026-07-28
clients, which is what the engine speaks).
Clients on handshake-era protocol versions are served but are not told about list
changes. When the child is not up when the bridge starts, the bridge presents itself under
the command's name and forwards every method.

Calls made while the child is restarting wait for it (bounded by ``ready_timeout``) and
then fail as a tool error (``isError``), never as a crash of the bridge. SIGTERM/SIGINT:
stop accepting, end listen streams, let calls in flight finish (bounded), stop the child,
exit 0. Exit codes: 0 stopped cleanly, 1 failed to start, 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, TextIO, TypeVar

import mcp_types
import uvicorn
from mcp import Client, MCPError, StdioServerParameters
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.subscriptions import (
    InMemorySubscriptionBus,
    ListenHandler,
    ServerEvent,
    ToolsListChanged,
)
from starlette.types import ASGIApp

from specmesh.backoff import BackoffPolicy
from specmesh.logs import configure_logging
from specmesh.mcp_client import ReconnectingMcpClient
from specmesh.uvicorn_server import QuietUvicornServer, bind_tcp

__all__ = ["StdioUpstream", "bridge_server", "main", "serve_http"]

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

_MODERN = "2026-"  # protocol versions from 2026-07-28 on deliver changes on subscriptions/listen

_T = TypeVar("_T")


class StdioUpstream:
    """One stdio MCP server kept running, with its current tool list.

    An async context manager: entering starts the child and returns once the first
    attempt succeeded or failed (bounded by ``connect_timeout``); leaving stops it. The
    child is kept up by :class:`specmesh.mcp_client.ReconnectingMcpClient`; this class adds
    what forwarding needs: calls wait (bounded) for a restarting child and fail as tool
    errors, never as a crash of the bridge.
    """

    def __init__(
        self,
        *,
        params: StdioServerParameters,
        on_tools_changed: Callable[[], Awaitable[None]] | None = None,
        on_changed: Callable[[ServerEvent], Awaitable[None]] | None = None,
        connect_timeout: float = 30.0,
        ready_timeout: float = 10.0,
        call_timeout: float = 300.0,
        initial_backoff: float = 0.2,
        max_backoff: float = 10.0,
        errlog: TextIO = sys.stderr,
    ) -> None:
        self._params = params
        self._ready_timeout = ready_timeout
        self._call_timeout = call_timeout
        self._conn = ReconnectingMcpClient(
            params,
            name=params.command,
            connect_timeout=connect_timeout,
            backoff=BackoffPolicy(initial=initial_backoff, maximum=max_backoff),
            on_tools_changed=on_tools_changed,
            on_changed=on_changed,
            errlog=errlog,
        )

    async def __aenter__(self) -> StdioUpstream:
        await self._conn.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._conn.aclose()

    @property
    def ready(self) -> bool:
        return self._conn.connected

    @property
    def starts(self) -> int:
        """Successful handshakes so far (1 + restarts)."""
        return self._conn.connects

    @property
    def server_info(self) -> mcp_types.Implementation | None:
        """How the child identified itself (at the last handshake; None before the first)."""
        return self._conn.server_info

    @property
    def capabilities(self) -> mcp_types.ServerCapabilities | None:
        """What the child declared it offers (at the last handshake)."""
        return self._conn.capabilities

    @property
    def instructions(self) -> str | None:
        return self._conn.instructions

    @property
    def last_error(self) -> str | None:
        return self._conn.last_error

    @property
    def tools(self) -> tuple[mcp_types.Tool, ...]:
        """The child's tools as last listed (kept while it restarts)."""
        return self._conn.tools

    def input_schema(self, name: str) -> Mapping[str, Any] | None:
        for t in self._conn.tools:
            if t.name == name:
                return t.input_schema
        return None

    async def wait_ready(self) -> bool:
        """Wait (bounded by ``ready_timeout``) until the child is connected."""
        return await self._conn.wait_connected(self._ready_timeout) is not None

    async def call_tool(
        self, name: str, arguments: Mapping[str, Any] | None, *, timeout: float | None = None
    ) -> mcp_types.CallToolResult:
        """Forward one call; a child that is down or dies mid-call gives a tool error.

        An error the child answers with (unknown tool, bad arguments) is raised as the
        same :class:`MCPError`, so the HTTP client sees what a direct client would.
        """
        client = await self._conn.wait_connected(self._ready_timeout)
        if client is None:
            return _tool_error(
                f"the stdio MCP server is not running ({self.last_error or 'starting'}); "
                "try again shortly"
            )
        try:
            return await client.call_tool(
                name,
                dict(arguments or {}),
                read_timeout_seconds=self._call_timeout if timeout is None else timeout,
            )
        except MCPError as e:
            if e.code != mcp_types.CONNECTION_CLOSED:
                raise
            return _tool_error("the stdio MCP server exited during the call; it is restarting")

    async def request(self, call: Callable[[Client], Awaitable[_T]]) -> _T:
        """Forward one request other than a tool call (``prompts/get``, ``resources/read``...).

        An error the child answers with is raised as the same :class:`MCPError`; a child
        that is down or dies meanwhile is an ``INTERNAL_ERROR``.
        """
        client = await self._conn.wait_connected(self._ready_timeout)
        if client is None:
            raise MCPError(
                mcp_types.INTERNAL_ERROR,
                f"the stdio MCP server is not running ({self.last_error or 'starting'}); "
                "try again shortly",
            )
        try:
            async with asyncio.timeout(self._call_timeout):
                return await call(client)
        except MCPError as e:
            if e.code != mcp_types.CONNECTION_CLOSED:
                raise
            raise MCPError(
                mcp_types.INTERNAL_ERROR,
                "the stdio MCP server exited during the request; it is restarting",
            ) from e


def _tool_error(text: str) -> mcp_types.CallToolResult:
    return mcp_types.CallToolResult(
        content=[mcp_types.TextContent(type="text", text=text)], is_error=True
    )


# ---------------------------------------------------------------- the HTTP-facing server


def bridge_server(
    upstream: StdioUpstream, *, name: str, listen: ListenHandler, rename: str | None = None
) -> Server[dict[str, Any]]:
    """A server presenting ``upstream`` as the child presents itself.

    Its ``serverInfo`` and instructions are the child's (``name`` is used only when the
    child has not identified itself yet; ``rename`` replaces the child's name). Prompts and
    resources are served when the child declares them (or when it is not known yet what it
    declares); ``listen`` serves change subscriptions.
    """
    Ctx = ServerRequestContext[dict[str, Any]]
    info = upstream.server_info
    caps = upstream.capabilities
    known = caps is not None

    async def list_tools(
        ctx: Ctx, params: mcp_types.PaginatedRequestParams | None
    ) -> mcp_types.ListToolsResult:
        if not upstream.ready:
            await upstream.wait_ready()
        return mcp_types.ListToolsResult(tools=list(upstream.tools))

    async def call_tool(
        ctx: Ctx, params: mcp_types.CallToolRequestParams
    ) -> mcp_types.CallToolResult:
        return await upstream.call_tool(params.name, params.arguments)

    async def list_prompts(
        ctx: Ctx, params: mcp_types.PaginatedRequestParams | None
    ) -> mcp_types.ListPromptsResult:
        cursor = params.cursor if params else None
        return await upstream.request(lambda c: c.list_prompts(cursor=cursor))

    async def get_prompt(
        ctx: Ctx, params: mcp_types.GetPromptRequestParams
    ) -> mcp_types.GetPromptResult:
        return await upstream.request(lambda c: c.get_prompt(params.name, params.arguments))

    async def list_resources(
        ctx: Ctx, params: mcp_types.PaginatedRequestParams | None
    ) -> mcp_types.ListResourcesResult:
        cursor = params.cursor if params else None
        return await upstream.request(lambda c: c.list_resources(cursor=cursor))

    async def list_resource_templates(
        ctx: Ctx, params: mcp_types.PaginatedRequestParams | None
    ) -> mcp_types.ListResourceTemplatesResult:
        cursor = params.cursor if params else None
        return await upstream.request(lambda c: c.list_resource_templates(cursor=cursor))

    async def read_resource(
        ctx: Ctx, params: mcp_types.ReadResourceRequestParams
    ) -> mcp_types.ReadResourceResult:
        return await upstream.request(lambda c: c.read_resource(params.uri))

    prompts = not known or (caps is not None and caps.prompts is not None)
    resources = not known or (caps is not None and caps.resources is not None)
    return Server(
        rename or (info.name if info is not None else name),
        version=info.version if info is not None else "",
        title=info.title if info is not None else None,
        description=info.description if info is not None else None,
        website_url=info.website_url if info is not None else None,
        icons=info.icons if info is not None else None,
        instructions=upstream.instructions,
        get_tool_input_schema=upstream.input_schema,
        on_list_tools=list_tools,
        on_call_tool=call_tool,
        on_list_prompts=list_prompts if prompts else None,
        on_get_prompt=get_prompt if prompts else None,
        on_list_resources=list_resources if resources else None,
        on_list_resource_templates=list_resource_templates if resources else None,
        on_read_resource=read_resource if resources else None,
        on_subscriptions_listen=listen,
    )


# ---------------------------------------------------------------- serving


def _url(host: str, port: int) -> str:
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://{f'[{shown}]' if ':' in shown else shown}:{port}/mcp"


async def serve_http(
    app: ASGIApp,
    *,
    host: str,
    port: int,
    stop: asyncio.Event,
    on_stopping: Callable[[], None] | None = None,
    grace: float = 5.0,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Serve an MCP ASGI app until ``stop`` is set, then shut down gracefully.

    Logs ``mcp server serving`` with the ``url`` (port 0 picks a free port) once the
    socket listens; ``on_stopping`` runs before connections are drained (end long-lived
    streams there); requests in flight get ``grace`` seconds.
    """
    sock = bind_tcp(host, port)
    try:
        bound_port = sock.getsockname()[1]
        server = QuietUvicornServer(
            uvicorn.Config(
                app,
                log_config=None,
                access_log=False,
                lifespan="on",
                timeout_graceful_shutdown=max(1, round(grace)),
            )
        )
        serving = asyncio.create_task(server.serve(sockets=[sock]), name="mcp-http")
        logger.info("mcp server serving", extra={"url": _url(host, bound_port), **(extra or {})})
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if serving.done():
            serving.result()
            raise RuntimeError("the HTTP server stopped before it was asked to")
        logger.info("stop requested; shutting down")
        if on_stopping is not None:
            on_stopping()
        server.should_exit = True
        await serving
    finally:
        sock.close()


async def _bridge(args: argparse.Namespace, command: list[str], stop: asyncio.Event) -> None:
    bus = InMemorySubscriptionBus()

    async def tools_changed() -> None:
        await bus.publish(ToolsListChanged())

    async def changed(event: ServerEvent) -> None:
        await bus.publish(event)

    params = StdioServerParameters(
        command=command[0],
        args=command[1:],
        env=dict(os.environ) if args.pass_environment else None,
    )
    listen = ListenHandler(bus)
    async with StdioUpstream(
        params=params, on_tools_changed=tools_changed, on_changed=changed
    ) as upstream:
        server = bridge_server(
            upstream, name=os.path.basename(command[0]), listen=listen, rename=args.name
        )
        await serve_http(
            server.streamable_http_app(host=args.host),
            host=args.host,
            port=args.port,
            stop=stop,
            on_stopping=listen.close,
            extra={"command": command[0], "upstream_ready": upstream.ready},
        )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="specmesh mcp-bridge",
        usage="%(prog)s [options] -- COMMAND [ARGS...]",
        description="Serve a stdio MCP server over streamable HTTP at /mcp.",
    )
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="listen port; 0 picks a free one")
    p.add_argument(
        "--name",
        default=None,
        help="server name (default: the name the server gives itself, else the command's)",
    )
    p.add_argument(
        "--pass-environment",
        action="store_true",
        help="give the child this process's whole environment (default: HOME, PATH, ...)",
    )
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``specmesh mcp-bridge``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1 :]
    else:
        command = []
    args = parser.parse_args(argv)
    if not command:
        parser.print_usage(sys.stderr)
        sys.stderr.write("error: the stdio server's command goes after --\n")
        return EXIT_USAGE
    configure_logging(level=str(args.log_level).upper())
    try:
        return asyncio.run(_run_until_signalled(lambda stop: _bridge(args, command, stop)))
    except OSError as e:
        logger.error("cannot start the bridge: %s", e)
        return EXIT_FAILED
    except Exception:
        logger.exception("the bridge failed")
        return EXIT_FAILED


async def _run_until_signalled(body: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await body(stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
