"""Spec intake: where the engine's snapshots come from.

A :class:`SnapshotFeed` is an async iterable of :class:`ResolvedSnapshot`: the current one
first, then one per change, for as long as the engine runs. Two implementations:

* :class:`GrpcSnapshotFeed` -- the sidecar's ``specmesh.v1.SpecSyncService.WatchSnapshots``
  over local gRPC; the stream is reopened with backoff whenever it breaks (the sidecar
  restarting, ``UNAVAILABLE``); a message that does not validate is logged and skipped.
  It is a :class:`SidecarLink`: ``connected`` while the stream is open, and each time it
  (re)opens, the engine's last status report is sent again, so a restarted sidecar learns
  at once what the engine serves (not at the next spec change).
* :class:`DirSnapshotFeed` -- development (``--spec-dir``): a folder with the agent's part
  files (``agent-base.json``, ``model.json``...), optionally ``prompts/`` (Prompt manifests
  or seed-style entries) and ``mcp/`` (McpServer manifests), polled for changes; each
  change that validates is a new revision; content that does not is logged and skipped.

Both keep ``last_error`` (secret-free) for the status report.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import ValidationError

from specmesh.backoff import BackoffPolicy, Reconnect
from specmesh.errors import SpecError, SpecmeshError
from specmesh.snapshot import PromptBundle, ResolvedSnapshot
from specmesh.spec.manifest import load_agent_folder, load_path
from specmesh.spec.models import (
    McpServerManifest,
    McpServerSpec,
    PromptEntry,
    PromptManifest,
    PromptRelease,
    ReleaseManifest,
    ReleaseSpec,
)
from specmesh.v1 import common_pb2, sidecar_pb2, sidecar_pb2_grpc

__all__ = [
    "DirSnapshotFeed",
    "GrpcSnapshotFeed",
    "InMemorySnapshotFeed",
    "SidecarLink",
    "SnapshotFeed",
    "StatusReporter",
    "snapshot_from_proto",
    "snapshot_to_proto",
]

logger = logging.getLogger(__name__)


class SnapshotFeed(Protocol):
    """Snapshots of one agent: the current one, then one per change."""

    def __aiter__(self) -> AsyncIterator[ResolvedSnapshot]: ...


@runtime_checkable
class StatusReporter(Protocol):
    """A feed that can tell its source which revision the engine serves."""

    async def report_status(
        self, *, serving_revision: int, failed_revision: int, error: str
    ) -> None: ...


@runtime_checkable
class SidecarLink(Protocol):
    """A feed whose source is the sidecar beside the engine: the engine is ready only while
    the link is up (without its sidecar it has neither callers nor a way out)."""

    @property
    def connected(self) -> bool:
        """Whether the snapshot stream to the sidecar is open."""
        ...

    @property
    def last_error(self) -> str | None:
        """Why the stream broke or a message was skipped; ``None`` when it works."""
        ...

    def add_connection_listener(self, listener: Callable[[bool], Awaitable[None]]) -> None:
        """Await ``listener(connected)`` each time the link comes up or goes down."""
        ...


class SnapshotDecodeError(SpecmeshError):
    """A snapshot message does not hold a valid snapshot."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InMemorySnapshotFeed:
    """Snapshots handed over in process with :meth:`publish` (tests, embedding)."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[ResolvedSnapshot] = asyncio.Queue()

    async def publish(self, snapshot: ResolvedSnapshot) -> None:
        """Make ``snapshot`` the next one the engine receives."""
        await self._queue.put(snapshot)

    def __aiter__(self) -> AsyncIterator[ResolvedSnapshot]:
        return self._drain()

    async def _drain(self) -> AsyncIterator[ResolvedSnapshot]:
        while True:
            yield await self._queue.get()


# ---------------------------------------------------------------- proto <-> model


def snapshot_from_proto(message: Any) -> ResolvedSnapshot:
    """Convert a ``specmesh.v1.Snapshot`` into a :class:`ResolvedSnapshot`.

    Raises :class:`SnapshotDecodeError` naming the field that does not validate.
    """
    try:
        spec_data = json.loads(message.spec_json)
        prompt_key = spec_data.get("base", {}).get("promptKey", "")
        prompt_raw = message.prompts_json.get(prompt_key)
        prompt = PromptBundle.model_validate_json(prompt_raw) if prompt_raw else PromptBundle()
        servers = {
            name: McpServerSpec.model_validate_json(raw)
            for name, raw in message.mcp_servers_json.items()
        }
        release = (
            ReleaseSpec.model_validate_json(message.release_json) if message.release_json else None
        )
        return ResolvedSnapshot(
            agent_name=message.agent_name,
            revision=message.revision,
            track=message.track or "stable",
            spec=spec_data,
            prompt=prompt,
            mcp_servers=servers,
            release=release,
        )
    except json.JSONDecodeError as e:
        raise SnapshotDecodeError(f"spec_json is not JSON: {e.msg}") from e
    except (ValidationError, AttributeError) as e:
        raise SnapshotDecodeError(f"invalid snapshot: {_first_errors(e)}") from e


def snapshot_to_proto(snapshot: ResolvedSnapshot, *, etcd_revision: int = 0) -> Any:
    """The ``specmesh.v1.Snapshot`` form of a snapshot (what the sidecar sends)."""
    produced = Timestamp()
    produced.GetCurrentTime()
    return sidecar_pb2.Snapshot(
        agent_name=snapshot.agent_name,
        revision=snapshot.revision,
        etcd_revision=etcd_revision,
        track=snapshot.track,
        spec_json=snapshot.spec.model_dump_json(),
        prompts_json={snapshot.spec.base.prompt_key: snapshot.prompt.model_dump_json()},
        mcp_servers_json={k: v.model_dump_json() for k, v in snapshot.mcp_servers.items()},
        produced_at=produced,
        source=sidecar_pb2.SNAPSHOT_SOURCE_ETCD,
        release_json=snapshot.release.model_dump_json() if snapshot.release else "",
    )


def _first_errors(e: Exception) -> str:
    if isinstance(e, ValidationError):
        parts = []
        for err in e.errors()[:3]:
            loc = ".".join(str(p) for p in err["loc"])
            parts.append(f"{loc}: {err['msg']}" if loc else str(err["msg"]))
        return "; ".join(parts)
    return type(e).__name__


# ---------------------------------------------------------------- gRPC


class GrpcSnapshotFeed:
    """Snapshots streamed by the sidecar's ``SpecSyncService.WatchSnapshots``.

    Iterating opens the stream and reopens it with exponential backoff (``max_backoff``,
    1 s by default: the sidecar is a local process) whenever it ends or fails; each
    iteration owns its channel and closes it when the iteration ends. The stream counts as
    connected once the sidecar sent its initial metadata (at once, before any snapshot);
    then the last status report is sent again.
    """

    def __init__(
        self,
        address: str,
        *,
        agent_name: str,
        initial_backoff: float = 0.2,
        max_backoff: float = 1.0,
    ) -> None:
        self._address = address
        self._agent_name = agent_name
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._channel: grpc.aio.Channel | None = None
        self._connected = False
        self._listeners: list[Callable[[bool], Awaitable[None]]] = []
        self._last_report: Any = None
        self.last_error: str | None = None
        """Why the last message was skipped or the stream broke; ``None`` when it works."""
        self.connects = 0
        """How many times the stream was opened."""

    @property
    def connected(self) -> bool:
        """Whether the snapshot stream to the sidecar is open."""
        return self._connected

    def add_connection_listener(self, listener: Callable[[bool], Awaitable[None]]) -> None:
        """Await ``listener(connected)`` each time the stream opens or breaks."""
        self._listeners.append(listener)

    async def _set_connected(self, connected: bool) -> None:
        if connected == self._connected:
            return
        self._connected = connected
        if connected:
            logger.info("connected to the sidecar at %s", self._address)
        for listener in self._listeners:
            await listener(connected)

    def __aiter__(self) -> AsyncIterator[ResolvedSnapshot]:
        return self._watch()

    async def _watch(self) -> AsyncIterator[ResolvedSnapshot]:
        reconnect = Reconnect(
            BackoffPolicy(initial=self._initial_backoff, maximum=self._max_backoff)
        )
        # gRPC's own reconnection backoff grows to minutes; the sidecar is local: <= 1 s
        reconnect_ms = max(int(self._max_backoff * 1000), 100)
        channel = grpc.aio.insecure_channel(
            self._address,
            options=[
                ("grpc.initial_reconnect_backoff_ms", min(100, reconnect_ms)),
                ("grpc.min_reconnect_backoff_ms", min(100, reconnect_ms)),
                ("grpc.max_reconnect_backoff_ms", reconnect_ms),
            ],
        )
        self._channel = channel
        stub = sidecar_pb2_grpc.SpecSyncServiceStub(channel)
        try:
            while True:
                self.connects += 1
                # wait_for_ready: while the sidecar is away the call waits for the channel,
                # which reconnects the moment the sidecar listens (gRPC backoff, <= 1 s)
                call = stub.WatchSnapshots(
                    sidecar_pb2.WatchSnapshotsRequest(agent_name=self._agent_name),
                    wait_for_ready=True,
                )
                try:
                    await call.wait_for_connection()
                    self.last_error = None
                    await self._set_connected(True)
                    await self._send_last_report()
                    async for response in call:
                        reconnect.reset()
                        try:
                            snapshot = snapshot_from_proto(response.snapshot)
                        except SnapshotDecodeError as e:
                            self.last_error = e.reason
                            logger.error(
                                "skipping snapshot revision %d: %s",
                                response.snapshot.revision,
                                e.reason,
                            )
                            continue
                        self.last_error = None
                        yield snapshot
                    self.last_error = "the sidecar ended the snapshot stream"
                    await self._set_connected(False)
                    logger.warning("snapshot stream from %s ended; reopening", self._address)
                    delay = reconnect.next_delay()
                except grpc.aio.AioRpcError as e:
                    delay = reconnect.next_delay()
                    self.last_error = f"snapshot stream failed: {e.code().name}"
                    await self._set_connected(False)
                    level = (
                        logging.ERROR
                        if e.code() == grpc.StatusCode.FAILED_PRECONDITION
                        else logging.WARNING
                    )
                    logger.log(
                        level,
                        "snapshot stream from %s failed (%s: %s); reopening in %.1f s",
                        self._address,
                        e.code().name,
                        e.details(),
                        delay,
                    )
                finally:
                    call.cancel()
                await reconnect.wait(delay)
        finally:
            self._channel = None
            self._connected = False  # the iteration ended: no listener to tell
            await channel.close()

    async def report_status(
        self, *, serving_revision: int, failed_revision: int, error: str
    ) -> None:
        """Tell the sidecar what the engine serves (best effort, while a stream is open;
        kept, and sent again each time the stream reopens)."""
        if failed_revision and serving_revision:
            state = common_pb2.ENGINE_STATE_DEGRADED
        elif failed_revision:
            state = common_pb2.ENGINE_STATE_FAILED
        else:
            state = common_pb2.ENGINE_STATE_SERVING
        self._last_report = sidecar_pb2.ReportStatusRequest(
            agent_name=self._agent_name,
            state=state,
            serving_revision=serving_revision,
            error_message=error[:1024],
        )
        if self._connected:
            await self._send_last_report()

    async def _send_last_report(self) -> None:
        channel, report = self._channel, self._last_report
        if channel is None or report is None:
            return
        request = sidecar_pb2.ReportStatusRequest()
        request.CopyFrom(report)
        request.reported_at.GetCurrentTime()
        stub = sidecar_pb2_grpc.SpecSyncServiceStub(channel)
        try:
            await stub.ReportStatus(request, timeout=5)
        except grpc.aio.AioRpcError as e:
            logger.warning("status report to the sidecar failed: %s", e.code().name)


# ---------------------------------------------------------------- folder


class DirSnapshotFeed:
    """Snapshots read from a spec folder, re-read whenever a file in it changes.

    The folder holds the six part files; ``prompts/`` and ``mcp/`` hold manifests
    (optional), and ``release.yaml`` a Release manifest (optional). Revision 1 is the
    first valid content; each valid change adds one. Invalid content is logged, kept in
    ``last_error`` and skipped: the previous snapshot stays current.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        agent_name: str,
        poll_interval: float = 0.5,
        track: str = "stable",
    ) -> None:
        self._path = Path(path)
        self._agent_name = agent_name
        self._poll_interval = poll_interval
        self._track = track
        self.last_error: str | None = None
        """Why the folder's current content was skipped; ``None`` when it is valid."""

    def __aiter__(self) -> AsyncIterator[ResolvedSnapshot]:
        return self._poll()

    async def _poll(self) -> AsyncIterator[ResolvedSnapshot]:
        revision = 0
        seen: object = None
        last_json: str | None = None
        while True:
            fingerprint = await asyncio.to_thread(_fingerprint, self._path)
            if fingerprint != seen:
                seen = fingerprint
                try:
                    snapshot = await asyncio.to_thread(self._load, revision + 1)
                except (SpecmeshError, ValidationError, OSError) as e:
                    self.last_error = _describe(e)
                    logger.error("spec folder %s skipped: %s", self._path, self.last_error)
                else:
                    self.last_error = None
                    content = snapshot.model_dump_json(exclude={"revision"})
                    if content != last_json:
                        last_json = content
                        revision += 1
                        logger.info("spec folder %s: revision %d", self._path, revision)
                        yield snapshot
            await asyncio.sleep(self._poll_interval)

    def _load(self, revision: int) -> ResolvedSnapshot:
        agent = load_agent_folder(self._path, name=self._agent_name).manifest
        spec = agent.spec
        prompt_key = spec.base.prompt_key
        versions: dict[str, PromptEntry] = {}
        release: PromptRelease | None = None
        for loaded in _manifests(self._path / "prompts"):
            m = loaded
            if isinstance(m, PromptManifest) and m.metadata.name == prompt_key:
                versions[m.spec.version] = PromptEntry(
                    prompt_key=prompt_key,
                    version=m.spec.version,
                    template=m.spec.template,
                    variables=m.spec.variables,
                    description=m.spec.description,
                )
                if m.spec.release is not None:
                    release = m.spec.release
        wanted = {ref.mcp_server_name for ref in spec.mcp_servers}
        servers: dict[str, McpServerSpec] = {}
        for m in _manifests(self._path / "mcp"):
            if isinstance(m, McpServerManifest) and m.metadata.name in wanted:
                servers[m.metadata.name] = m.spec
        agent_release: ReleaseSpec | None = None
        for name in ("release.yaml", "release.yml", "release.json"):
            for m in _manifests(self._path / name):
                if isinstance(m, ReleaseManifest):
                    agent_release = m.spec
        return ResolvedSnapshot(
            agent_name=self._agent_name,
            revision=revision,
            track=self._track,
            spec=spec,
            prompt=PromptBundle(versions=versions, release=release),
            mcp_servers=servers,
            release=agent_release,
        )


def _manifests(path: Path) -> list[Any]:
    if not path.exists():
        return []
    return [loaded.manifest for loaded in load_path(path)]


def _fingerprint(path: Path) -> tuple[tuple[str, int, int], ...]:
    out: list[tuple[str, int, int]] = []
    if not path.exists():
        return ()
    for p in sorted(path.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            st = p.stat()
            out.append((str(p.relative_to(path)), st.st_mtime_ns, st.st_size))
    return tuple(out)


def _describe(e: Exception) -> str:
    if isinstance(e, SpecError):
        return "; ".join(str(i) for i in e.issues[:5]) or str(e)
    if isinstance(e, ValidationError):
        return _first_errors(e)
    return str(e)
