"""What each MCP Registry entry really offers: its tools, listed with the official ``mcp``
client and kept fresh.

* :func:`list_mcp_tools` connects once (streamable HTTP or SSE, as the entry says) with the
  given headers and query parameters and returns ``[{name, description, inputSchema}]``;
  any failure is a :class:`~control_plane.errors.BadRequestError` whose message names the
  server and what went wrong (an HTTP status, an MCP error), never a header, a parameter
  or a URL carrying them.
* :class:`McpToolCatalog` keeps a :class:`ToolListing` per entry: listed when it first sees
  the registry, again every ``refresh_seconds``, and at once when an entry changes (a watch
  on ``<prefix>/mcp/``) or when the credentials it would use change (a watch on
  ``<prefix>/agents/``). A failed listing keeps the tools last listed from the same URL and
  records the error.

**Credentials.** A server that wants a key is listed with the credentials a sidecar would
add: the ``headers`` / ``queryParams`` of the first agent (by name) whose spec names the
server (preferring one that sets every name of the entry's ``credentialTemplate``).
``vault://`` references are read with the control plane's own Vault client (it writes the
agents' secrets, so it may read them); each value read is registered with
:func:`specmesh.logs.register_secret` and goes nowhere but the request to the MCP server.
The listing reports which agent's credentials were used, never a value.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import httpx2
from mcp import Client, MCPError
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

from control_plane.errors import BadRequestError
from specmesh.addresses import resolve_url
from specmesh.aio import cancel_and_wait
from specmesh.backoff import BackoffPolicy, Reconnect
from specmesh.errors import SecretError, SecretReferenceError, SpecmeshError
from specmesh.logs import register_secret
from specmesh.secrets import VaultRef, is_reference
from specmesh.spec.models import McpServerSpec
from specmesh.store import SpecStore
from specmesh.watch import PrefixWatcher

__all__ = [
    "Credentials",
    "McpToolCatalog",
    "SecretReader",
    "ToolLister",
    "ToolListing",
    "list_mcp_tools",
]

logger = logging.getLogger(__name__)


class SecretReader(Protocol):
    """Reads one ``vault://`` reference (:class:`~specmesh.vault.VaultClient` is one)."""

    async def read(self, ref: VaultRef) -> str: ...


class ToolLister(Protocol):
    """Lists the tools of one server (:func:`list_mcp_tools` is the real one)."""

    def __call__(
        self,
        url: str,
        *,
        transport: str,
        headers: Mapping[str, str],
        params: Mapping[str, str],
        timeout: float,
    ) -> Awaitable[list[dict[str, Any]]]: ...


async def list_mcp_tools(
    url: str,
    *,
    transport: str = "streamable-http",
    headers: Mapping[str, str] | None = None,
    params: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> list[dict[str, Any]]:
    """``[{name, description, inputSchema}]`` of the server at ``url`` (every page)."""
    statuses: list[int] = []
    timeout_s = timeout

    async def note_status(response: httpx2.Response) -> None:
        if response.status_code >= 400:
            statuses.append(response.status_code)

    def http_client(
        headers: dict[str, str] | None = None,
        timeout: httpx2.Timeout | None = None,
        auth: httpx2.Auth | None = None,
    ) -> httpx2.AsyncClient:
        return httpx2.AsyncClient(
            headers=headers,
            params=dict(params or {}),
            timeout=timeout or httpx2.Timeout(timeout_s),
            auth=auth,
            event_hooks={"response": [note_status]},
        )

    where = _without_query(url)
    try:
        async with asyncio.timeout(timeout), contextlib.AsyncExitStack() as stack:
            if transport == "sse":
                connection: Any = sse_client(
                    url,
                    headers=dict(headers or {}),
                    timeout=timeout,
                    httpx_client_factory=http_client,
                )
            else:
                http = await stack.enter_async_context(http_client(headers=dict(headers or {})))
                connection = streamable_http_client(url, http_client=http)
            client = await stack.enter_async_context(Client(connection, cache=None))
            tools: list[Any] = []
            cursor: str | None = None
            while True:
                page = await client.list_tools(cursor=cursor)
                tools.extend(page.tools)
                if not (cursor := page.next_cursor):
                    break
    except TimeoutError as e:
        raise BadRequestError(f"MCP server at {where} did not answer within {timeout:g}s") from e
    except Exception as e:  # any failure of the server is a fact to report, not a 500
        if statuses:
            reason = f"it answered HTTP {statuses[-1]}"
        else:
            reason = f"could not be reached or listed: {_kind(e)}"
        raise BadRequestError(f"MCP server at {where}: {reason}") from e
    return [
        {"name": t.name, "description": t.description or "", "inputSchema": t.input_schema}
        for t in tools
    ]


def _without_query(url: str) -> str:
    """``url`` without user info, query or fragment (the parts that may carry a secret)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _kind(e: BaseException) -> str:
    """The error's type (and an MCP error's code): never its text, which may quote a URL."""
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    if isinstance(e, MCPError):
        return f"MCP error {e.code}"
    return type(e).__name__


# ---------------------------------------------------------------- the catalog


@dataclass(frozen=True)
class Credentials:
    """What a sidecar would add to requests to one server: references, not values."""

    agent: str | None = None
    """The agent whose spec they come from (None: no agent names the server)."""
    headers: tuple[tuple[str, str], ...] = ()
    params: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ToolListing:
    """The tools of one MCP Registry entry as last listed."""

    tools: tuple[dict[str, Any], ...] = ()
    refreshed_at: datetime | None = None
    """When the tools were last listed successfully (None: never)."""
    checked_at: datetime | None = None
    """When the last attempt ended."""
    error: str | None = None
    """Why the last attempt failed (None: it succeeded)."""
    credentials_from: str | None = None
    """The agent whose credentials were sent (None: none were)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "tools": [dict(t) for t in self.tools],
            "refreshedAt": _iso(self.refreshed_at),
            "checkedAt": _iso(self.checked_at),
            "error": self.error,
            "credentialsFrom": self.credentials_from,
        }


def _iso(at: datetime | None) -> str | None:
    return at.isoformat().replace("+00:00", "Z") if at else None


@dataclass(frozen=True)
class _Target:
    """What a listing depends on: when it changes, the server is listed again."""

    url: str
    transport: str
    credentials: Credentials


class McpToolCatalog:
    """Tool listings of every MCP Registry entry, kept fresh. An async context manager:
    entering starts the watches and the schedule, leaving stops them."""

    def __init__(
        self,
        *,
        store: SpecStore,
        secrets: SecretReader,
        lister: ToolLister = list_mcp_tools,
        addresses: Mapping[str, str] | None = None,
        refresh_seconds: float = 300.0,
        timeout: float = 10.0,
    ) -> None:
        self._store = store
        self._secrets = secrets
        self._lister = lister
        self._addresses = dict(addresses or {})
        self.refresh_seconds = refresh_seconds
        self.timeout = timeout
        self._listings: dict[str, ToolListing] = {}
        self._targets: dict[str, _Target] = {}
        self._changed = asyncio.Event()
        self._locks: dict[str, asyncio.Lock] = {}
        self._task: asyncio.Task[None] | None = None
        self.syncs = 0
        """Completed passes over the registry (for tests and metrics)."""

    async def __aenter__(self) -> McpToolCatalog:
        self._task = asyncio.create_task(self._run(), name="mcp-tool-catalog")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    # ------------------------------------------------------------ reading

    def listings(self) -> dict[str, ToolListing]:
        """Every entry's listing (an entry not listed yet has none)."""
        return dict(self._listings)

    def listing(self, name: str) -> ToolListing | None:
        return self._listings.get(name)

    async def refresh(self, name: str) -> ToolListing:
        """List one entry now (unknown entry: :class:`~specmesh.errors.NotFoundError`)."""
        spec = await self._store.get_mcp_server(name)
        target = await self._target(name, spec, await self._agent_specs())
        return await self._list(name, target)

    # ------------------------------------------------------------ keeping fresh

    async def sync(self, *, force: bool = False) -> None:
        """List the entries that are new or whose target changed (every one if ``force``);
        forget deleted ones."""
        servers = await self._store.list_mcp_servers()
        agents = await self._agent_specs()
        for gone in set(self._listings) - set(servers):
            self._listings.pop(gone, None)
            self._targets.pop(gone, None)
        due: list[tuple[str, _Target]] = []
        for name, spec in sorted(servers.items()):
            target = await self._target(name, spec, agents)
            if force or self._targets.get(name) != target or name not in self._listings:
                due.append((name, target))
        async with asyncio.TaskGroup() as tasks:
            for name, target in due:
                tasks.create_task(self._list(name, target))
        self.syncs += 1

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._watch(self._store.keys.mcp_servers()))
            tasks.create_task(self._watch(self._store.keys.agents(), only="meta"))
            tasks.create_task(self._schedule())

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        next_full = loop.time()
        cap = min(5.0, self.refresh_seconds)
        failing = Reconnect(BackoffPolicy(initial=min(0.5, cap), maximum=cap))
        while True:
            force = loop.time() >= next_full
            if force:
                next_full = loop.time() + self.refresh_seconds
            self._changed.clear()
            try:
                await self.sync(force=force)
                failing.reset()
            except asyncio.CancelledError:
                raise
            except Exception:  # top of the task: etcd unavailable, ... try again soon
                delay = failing.next_delay()
                logger.exception(
                    "refreshing the MCP Registry's tools failed; retrying in %.1f s", delay
                )
                next_full = min(next_full, loop.time() + delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(next_full - loop.time(), 0.0)):
                    await self._changed.wait()

    async def _watch(self, prefix: str, *, only: str | None = None) -> None:
        """Wake the schedule on every change under ``prefix`` (with ``only``: of the keys
        ``<prefix><name>/<only>``: an agent's spec changes only with its meta; its release
        does not change what its sidecar sends)."""
        watcher = PrefixWatcher(etcd=self._store.etcd, prefix=prefix)
        try:
            async for update in watcher.updates():
                if update.reset or any(
                    only is None or e.key.removeprefix(prefix).partition("/")[2] == only
                    for e in update.events
                ):
                    self._changed.set()
        finally:
            watcher.close()

    # ------------------------------------------------------------ one entry

    async def _agent_specs(self) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        for summary in sorted(await self._store.list_agents(), key=lambda a: a.name):
            try:
                record = await self._store.get_agent(summary.name)
                out.append((record.name, record.spec_model()))
            except SpecmeshError as e:  # deleted meanwhile, or not valid: not a source
                logger.debug("agent %s skipped as a credential source: %s", summary.name, e)
        return out

    async def _target(
        self, name: str, spec: McpServerSpec, agents: list[tuple[str, Any]]
    ) -> _Target:
        needed = set(spec.credential_template.headers) | set(spec.credential_template.query_params)
        chosen: Credentials | None = None
        for agent, agent_spec in agents:
            for ref in agent_spec.mcp_servers:
                if ref.mcp_server_name != name:
                    continue
                found = Credentials(
                    agent=agent,
                    headers=tuple(sorted(ref.headers.items())),
                    params=tuple(sorted(ref.query_params.items())),
                )
                if needed <= set(ref.headers) | set(ref.query_params):
                    return _Target(spec.url, spec.transport, found)
                chosen = chosen or found
        return _Target(spec.url, spec.transport, chosen or Credentials())

    async def _list(self, name: str, target: _Target) -> ToolListing:
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            previous = self._listings.get(name)
            same_server = previous is not None and self._targets.get(name, target).url == (
                target.url
            )
            kept = previous.tools if previous is not None and same_server else ()
            refreshed = previous.refreshed_at if previous is not None and same_server else None
            try:
                headers = await self._resolve(target.credentials, target.credentials.headers)
                params = await self._resolve(target.credentials, target.credentials.params)
                tools = await self._lister(
                    resolve_url(target.url, self._addresses),
                    transport=target.transport,
                    headers=headers,
                    params=params,
                    timeout=self.timeout,
                )
            except (BadRequestError, _CredentialError) as e:
                listing = ToolListing(
                    tools=kept,
                    refreshed_at=refreshed,
                    checked_at=datetime.now(UTC),
                    error=str(e),
                    credentials_from=target.credentials.agent,
                )
                if previous is None or previous.error != listing.error:
                    logger.warning("listing the tools of MCP server %s failed: %s", name, e)
            else:
                listing = ToolListing(
                    tools=tuple(tools),
                    refreshed_at=datetime.now(UTC),
                    checked_at=datetime.now(UTC),
                    credentials_from=target.credentials.agent,
                )
                if previous is None or previous.tools != listing.tools:
                    logger.info(
                        "MCP server %s lists %d tools",
                        name,
                        len(tools),
                        extra={"mcp_server": name, "credentials_from": target.credentials.agent},
                    )
            self._listings[name] = listing
            self._targets[name] = target
            return listing

    async def _resolve(
        self, credentials: Credentials, items: tuple[tuple[str, str], ...]
    ) -> dict[str, str]:
        out: dict[str, str] = {}
        for key, value in items:
            if not is_reference(value):
                out[key] = value
                continue
            try:
                ref = VaultRef.parse(value)
                secret = await self._secrets.read(ref)
            except (SecretError, SecretReferenceError) as e:
                raise _CredentialError(
                    f"credential {key!r} of agent {credentials.agent} ({value}) is unavailable: {e}"
                ) from e
            register_secret(secret)
            out[key] = secret
        return out


class _CredentialError(Exception):
    """A reference could not be read (the message names it, never a value)."""
