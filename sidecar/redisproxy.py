"""The Redis proxy: the engine's way to its memory store, with the password added here.

The engine holds no secret, so it cannot authenticate to Redis itself. It connects, with
no password, to this proxy on loopback (``SPECMESH_REDIS_PROXY``); for each connection the
proxy opens one to the current snapshot's ``memory.address``, authenticates with
``AUTH [username] password`` resolved from Vault (``memory.credentials.password``,
optional ``memory.credentials.username``), selects the database of the URL path
(``redis://host:6379/2`` -> ``SELECT 2``), checks that each answered ``+OK``, then pipes
bytes both ways untouched (RESP2 or RESP3, pipelining, pub/sub all pass through).

* The proxy follows the snapshot: an address or credential change applies to new
  connections; open ones keep their upstream until either side closes.
* It listens only while the snapshot's memory is ``storageType: redis`` (first such
  snapshot opens the listener; it stays open afterwards), so agents with in-process
  memory bind no port.
* ``rediss://`` upstreams are reached over TLS (system trust store).
* Fixed-upstream mode (``upstream=``): the proxy listens at once and always goes to that
  upstream, whatever the snapshot says -- the A2A task store's proxy
  (``SPECMESH_TASK_STORE_PROXY`` to ``SPECMESH_TASK_STORE_UPSTREAM``, password
  ``SPECMESH_TASK_STORE_PASSWORD``), which is infrastructure, not part of the agent's spec.
* When the upstream cannot be reached or refuses the credentials, the engine's
  connection receives one RESP error (``-ERR specmesh: ...``, naming the reference or the
  address, never a value) and is closed.

Errors (internal, mapped to that RESP error)::

    RedisProxyError            (reason)
    +-- upstream unreachable / timed out / TLS failure
    +-- credential_unavailable (CredentialUnavailableError underneath)
    +-- auth_refused / select_refused (the upstream's answer was not +OK)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType

from specmesh.addresses import AddressError, parse_redis_url, resolve_host_port
from specmesh.aio import cancel_and_wait
from specmesh.snapshot import ResolvedSnapshot
from specmesh.spec.models import MemorySpec

from .credentials import CredentialResolver, CredentialUnavailableError
from .state import SnapshotHolder

__all__ = [
    "RedisProxy",
    "RedisProxyError",
    "RedisUpstream",
    "fixed_redis_upstream",
    "redis_upstream",
]

logger = logging.getLogger(__name__)

_CHUNK = 64 * 1024
_MAX_REPLY_LINE = 4096


class RedisProxyError(Exception):
    """The upstream connection could not be set up; ``reason`` is safe to show."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class RedisUpstream:
    """Where and how to reach the memory store (references, not values)."""

    host: str
    port: int
    db: int
    tls: bool
    password_ref: str | None
    username_ref: str | None
    username: str | None = None
    """A username given as such (not a secret): a fixed upstream's URL
    ``redis://<user>@host:port/db``, e.g. the agent's own Redis ACL user."""


def redis_upstream(memory: MemorySpec) -> RedisUpstream | None:
    """The upstream of a memory part; ``None`` unless it is ``storageType: redis``."""
    if memory.storage_type != "redis" or not memory.address:
        return None
    try:
        address = parse_redis_url(memory.address, setting="memory.address")
    except AddressError as e:
        raise RedisProxyError(str(e)) from e
    creds = {k.lower(): v for k, v in memory.credentials.items()}
    return RedisUpstream(
        host=address.host,
        port=address.port,
        db=address.db,
        tls=address.tls,
        password_ref=creds.get("password"),
        username_ref=creds.get("username"),
    )


def fixed_redis_upstream(
    url: str, *, password_ref: str | None, username_ref: str | None = None
) -> RedisUpstream:
    """The upstream of a fixed-upstream proxy: a ``redis://`` / ``rediss://`` URL (no
    password in it; a username may be: ``redis://<user>@host:port/db``) and references to
    its credentials."""
    try:
        address = parse_redis_url(url, setting="SPECMESH_TASK_STORE_UPSTREAM")
    except AddressError as e:
        raise RedisProxyError(str(e)) from e
    if address.password is not None:
        raise RedisProxyError("upstream URL must not carry a password (give a vault:// reference)")
    return RedisUpstream(
        host=address.host,
        port=address.port,
        db=address.db,
        tls=address.tls,
        password_ref=password_ref,
        username_ref=username_ref,
        username=address.username,
    )


def _command(*args: str) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _error_reply(reason: str) -> bytes:
    text = " ".join(f"specmesh: {reason}".split())  # one line, RESP-safe
    return f"-ERR {text}\r\n".encode()


class RedisProxy:
    """The loopback listener. Use as an async context manager (``start``/``stop``)."""

    def __init__(
        self,
        *,
        snapshots: SnapshotHolder,
        credentials: CredentialResolver,
        host: str = "127.0.0.1",
        port: int = 0,
        unix_path: str | None = None,
        connect_timeout: float = 5.0,
        lazy: bool = True,
        service_addresses: Mapping[str, str] | None = None,
        upstream: RedisUpstream | None = None,
        label: str = "memory store",
    ) -> None:
        """``upstream`` fixes the upstream (listening at once) instead of following the
        snapshot's memory part; ``label`` names the store in errors and logs."""
        self._snapshots = snapshots
        self._upstream = upstream
        self._label = label
        self._credentials = credentials
        self.host = host
        self.port = port
        self.unix_path = unix_path
        self.connect_timeout = connect_timeout
        self._lazy = lazy
        self._service_addresses = dict(service_addresses or {})
        self._server: asyncio.Server | None = None
        self._watch: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._listening = asyncio.Event()
        self.connections_total = 0
        """Engine connections accepted so far."""
        self.upstream_failures = 0
        """Connections refused because the upstream could not be set up."""

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> RedisProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Listen now (``lazy=False``) or once the snapshot's memory is Redis."""
        if (
            not self._lazy
            or self._upstream is not None
            or self._wants_listener(self._snapshots.current)
        ):
            await self._listen()
        if self._server is None:
            self._watch = asyncio.create_task(self._follow(), name="redis-proxy-follow")

    async def stop(self) -> None:
        """Stop listening and close every piped connection."""
        await cancel_and_wait(self._watch)
        self._watch = None
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
            if self.unix_path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.unix_path)

    @property
    def listening(self) -> bool:
        return self._server is not None

    async def wait_listening(self) -> None:
        await self._listening.wait()

    @property
    def address(self) -> str:
        """``host:port`` or ``unix:path``, as the engine's ``SPECMESH_REDIS_PROXY``."""
        return f"unix:{self.unix_path}" if self.unix_path else f"{self.host}:{self.port}"

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    @staticmethod
    def _wants_listener(snapshot: ResolvedSnapshot | None) -> bool:
        return snapshot is not None and snapshot.spec.memory.storage_type == "redis"

    async def _listen(self) -> None:
        if self.unix_path:
            self._server = await asyncio.start_unix_server(self._accept, path=self.unix_path)
        else:
            self._server = await asyncio.start_server(self._accept, self.host, self.port)
            if self.port == 0:
                self.port = int(self._server.sockets[0].getsockname()[1])
        self._listening.set()
        logger.info("redis proxy (%s) listening on %s", self._label, self.address)

    async def _follow(self) -> None:
        version = self._snapshots.version
        while self._server is None:
            if self._wants_listener(self._snapshots.current):
                try:
                    await self._listen()
                except OSError as e:
                    logger.error("redis proxy cannot listen on %s: %s", self.address, e)
                else:
                    return
            version = await self._snapshots.wait_newer(version)

    # ------------------------------------------------------------ connections

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)
        self.connections_total += 1
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            try:
                upstream = await self._open_upstream()
            except RedisProxyError as e:
                self.upstream_failures += 1
                logger.warning("redis proxy: engine connection refused: %s", e.reason)
                writer.write(_error_reply(e.reason))
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                return
            up_reader, up_writer = upstream
            pipes = (
                asyncio.create_task(_pipe(reader, up_writer)),
                asyncio.create_task(_pipe(up_reader, writer)),
            )
            try:
                await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pipe in pipes:
                    pipe.cancel()
                await asyncio.gather(*pipes, return_exceptions=True)
        except asyncio.CancelledError:
            pass  # stop(): close both sides below
        except Exception:  # top of a connection task: log, close both sides
            logger.exception("redis proxy connection failed")
        finally:
            if upstream is not None:
                await _close(upstream[1])
            await _close(writer)

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        target = self._upstream
        if target is None:
            snapshot = self._snapshots.current
            if snapshot is None:
                raise RedisProxyError("the sidecar has no spec yet")
            target = redis_upstream(snapshot.spec.memory)
            if target is None:
                raise RedisProxyError("the agent's memory is not storageType redis")
        try:
            password = (
                await self._credentials.resolve(target.password_ref)
                if target.password_ref
                else None
            )
            username = (
                await self._credentials.resolve(target.username_ref)
                if target.username_ref
                else target.username
            )
        except CredentialUnavailableError as e:
            raise RedisProxyError(f"credential_unavailable: {e}") from e
        host, port = resolve_host_port(
            target.host, target.port, self._service_addresses, default_port=6379
        )
        where = f"{host}:{port}"
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(
                    host,
                    port,
                    ssl=ssl.create_default_context() if target.tls else None,
                    server_hostname=target.host if target.tls else None,
                    limit=_CHUNK * 4,
                )
        except TimeoutError as e:
            raise RedisProxyError(f"{self._label} {where} did not answer in time") from e
        except (OSError, ssl.SSLError) as e:
            raise RedisProxyError(f"{self._label} {where} unreachable ({type(e).__name__})") from e
        try:
            async with asyncio.timeout(self.connect_timeout):
                if password is not None:
                    args = ("AUTH", username, password) if username else ("AUTH", password)
                    await _expect_ok(
                        reader, writer, _command(*args), what="auth_refused", label=self._label
                    )
                if target.db:
                    await _expect_ok(
                        reader,
                        writer,
                        _command("SELECT", str(target.db)),
                        what="select_refused",
                        label=self._label,
                    )
        except BaseException as e:
            await _close(writer)
            if isinstance(e, TimeoutError):
                raise RedisProxyError(f"{self._label} {where} did not answer in time") from e
            if isinstance(e, (OSError, asyncio.IncompleteReadError)):
                raise RedisProxyError(f"{self._label} {where} closed the connection") from e
            raise
        return reader, writer


async def _expect_ok(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    command: bytes,
    *,
    what: str,
    label: str,
) -> None:
    writer.write(command)
    await writer.drain()
    line = await reader.readuntil(b"\r\n")
    if line[:3] != b"+OK":
        # The upstream's own error names no secret (e.g. "-WRONGPASS invalid username-password
        # pair"); keep only its first word.
        code = line[1:].split(b" ", 1)[0].decode("ascii", "replace").strip()[:_MAX_REPLY_LINE]
        raise RedisProxyError(f"{what}: the {label} answered {code or 'nothing'}")


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
