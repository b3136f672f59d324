"""The SpecSyncService the engine calls (``proto/specmesh/v1/sidecar.proto``), on grpc.aio.

``WatchSnapshots`` sends the current snapshot, then the newest one after each change
(waiting on :meth:`SnapshotHolder.wait_newer`, so none is missed; a slow reader gets the
latest, intermediate ones may be coalesced). ``GetSnapshot`` answers once.
``ReportStatus`` records what the engine serves: readiness and the Agent Registry entry
follow it (listeners are called with each :class:`EngineStatus`).

An open ``WatchSnapshots`` stream is how the sidecar knows its engine is alive: the stream
sends its initial metadata at once (the engine then knows it is connected and re-reports
its status), and when the last stream closes -- the engine's process died, its socket
closed -- the engine counts as disconnected and what it reported is forgotten, so a
restarted engine is not taken for serving before it reports (docs/runtime.md, "Health
contract").

A :class:`~specmesh.snapshot.ResolvedSnapshot` holds ``vault://`` references only, so
what goes on the wire is secret-free; :func:`snapshot_to_proto` is the one conversion.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from sidecar.errors import (
    AgentMismatchError,
    ListenAddressError,
    SidecarError,
    SnapshotUnavailableError,
    grpc_status,
)
from sidecar.ops import ReadinessReport, SidecarMetrics
from sidecar.state import SnapshotHolder
from sidecar.sync import SpecSync, SyncedSnapshot
from specmesh.addresses import format_host_port, parse_listen
from specmesh.names import resource_name
from specmesh.v1 import common_pb2, sidecar_pb2, sidecar_pb2_grpc

__all__ = ["EngineStatus", "SpecSyncServer", "snapshot_to_proto"]

logger = logging.getLogger(__name__)

_SOURCES = {
    "etcd": sidecar_pb2.SNAPSHOT_SOURCE_ETCD,
    "disk_cache": sidecar_pb2.SNAPSHOT_SOURCE_DISK_CACHE,
}
_STATE_NAMES = {
    common_pb2.ENGINE_STATE_UNSPECIFIED: "unspecified",
    common_pb2.ENGINE_STATE_STARTING: "starting",
    common_pb2.ENGINE_STATE_SERVING: "serving",
    common_pb2.ENGINE_STATE_DEGRADED: "degraded",
    common_pb2.ENGINE_STATE_FAILED: "failed",
}


@dataclass(frozen=True)
class EngineStatus:
    """What the engine last reported (``state`` is one of ``unspecified``, ``starting``,
    ``serving``, ``degraded``, ``failed``), and whether it is connected now."""

    state: str = "unspecified"
    serving_revision: int = 0
    serving_etcd_revision: int = 0
    failed_etcd_revision: int = 0
    error_message: str = ""
    reported_at: datetime | None = None
    connected: bool = False
    """A snapshot stream of the engine is open (its process is alive)."""

    @property
    def serving(self) -> bool:
        """The engine is connected and serves some snapshot (the newest, or an older one
        when degraded)."""
        return (
            self.connected and self.state in ("serving", "degraded") and self.serving_revision > 0
        )


def snapshot_to_proto(synced: SyncedSnapshot) -> Any:
    """``SyncedSnapshot`` -> ``specmesh.v1.Snapshot``."""
    snap = synced.snapshot
    produced_at = Timestamp()
    produced_at.FromDatetime(synced.produced_at)
    return sidecar_pb2.Snapshot(
        agent_name=snap.agent_name,
        revision=snap.revision,
        etcd_revision=synced.etcd_revision,
        track=snap.track,
        spec_json=snap.spec.model_dump_json(by_alias=True),
        prompts_json={snap.spec.base.prompt_key: snap.prompt.model_dump_json(by_alias=True)},
        mcp_servers_json={
            name: server.model_dump_json(by_alias=True) for name, server in snap.mcp_servers.items()
        },
        produced_at=produced_at,
        source=_SOURCES[synced.source],
        release_json=snap.release.model_dump_json(by_alias=True) if snap.release else "",
    )


class _Servicer(sidecar_pb2_grpc.SpecSyncServiceServicer):
    def __init__(self, server: SpecSyncServer) -> None:
        self._s = server

    async def _refuse(self, context: grpc.aio.ServicerContext, error: SidecarError) -> None:
        await context.abort(grpc_status(error), str(error))

    async def WatchSnapshots(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        try:
            self._s.check_agent(request.agent_name)
        except AgentMismatchError as e:
            await self._refuse(context, e)
            return
        metrics = self._s.metrics
        if metrics is not None:
            metrics.sync_streams.inc()
        self._s.stream_opened()
        try:
            # at once, not with the first snapshot: the engine learns it is connected
            await context.send_initial_metadata(())
            version = 0
            while True:
                version = await self._s.holder.wait_newer(version)
                synced = self._s.sync.current
                if synced is None:  # pragma: no cover - the holder only moves with a snapshot
                    continue
                yield sidecar_pb2.WatchSnapshotsResponse(snapshot=snapshot_to_proto(synced))
        finally:
            self._s.stream_closed()
            if metrics is not None:
                metrics.sync_streams.dec()

    async def GetSnapshot(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            self._s.check_agent(request.agent_name)
            synced = self._s.sync.current
            if synced is None:
                raise SnapshotUnavailableError(agent=self._s.agent, reason=self._s.sync.status())
        except SidecarError as e:
            await self._refuse(context, e)
            raise AssertionError("unreachable") from e  # abort raises
        return sidecar_pb2.GetSnapshotResponse(snapshot=snapshot_to_proto(synced))

    async def ReportStatus(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            self._s.check_agent(request.agent_name)
        except AgentMismatchError as e:
            await self._refuse(context, e)
            raise AssertionError("unreachable") from e
        reported = (
            request.reported_at.ToDatetime(tzinfo=UTC)
            if request.HasField("reported_at")
            else datetime.now(UTC)
        )
        self._s.record_status(
            EngineStatus(
                state=_STATE_NAMES.get(request.state, "unspecified"),
                serving_revision=request.serving_revision,
                serving_etcd_revision=request.serving_etcd_revision,
                failed_etcd_revision=request.failed_etcd_revision,
                error_message=request.error_message[:2000],
                reported_at=reported,
                connected=self._s.engine_connected,
            )
        )
        return sidecar_pb2.ReportStatusResponse()


class SpecSyncServer:
    """Serves the sync's snapshots to the engine and records its status."""

    def __init__(
        self,
        *,
        address: str,
        agent: str,
        sync: SpecSync,
        holder: SnapshotHolder,
        metrics: SidecarMetrics | None = None,
    ) -> None:
        try:
            self._kind, self._host, self._port = parse_listen(address, setting="SPECMESH_SYNC_ADDR")
        except ValueError as e:
            raise ListenAddressError(address=address, reason=str(e)) from e
        self.address = address
        self.agent = agent
        self.sync = sync
        self.holder = holder
        self.metrics = metrics
        self.engine = EngineStatus()
        self._streams = 0
        self._listeners: list[Callable[[EngineStatus], None]] = []
        self._server: grpc.aio.Server | None = None
        self.port: int | None = None

    # ------------------------------------------------------------ status

    def check_agent(self, name: str) -> None:
        if _resource_name_or_none(name) != resource_name(self.agent):
            raise AgentMismatchError(expected=self.agent, got=name)

    def add_status_listener(self, listener: Callable[[EngineStatus], None]) -> None:
        """Call ``listener`` with every status the engine reports, and when it connects or
        disconnects."""
        self._listeners.append(listener)

    @property
    def engine_connected(self) -> bool:
        """Whether a snapshot stream of the engine is open."""
        return self._streams > 0

    def stream_opened(self) -> None:
        """A ``WatchSnapshots`` stream opened (the engine is alive)."""
        self._streams += 1
        if self._streams == 1:
            logger.info("engine connected (snapshot stream open)")
            self.record_status(replace(self.engine, connected=True))

    def stream_closed(self) -> None:
        """A ``WatchSnapshots`` stream closed; the last one: the engine is gone."""
        self._streams -= 1
        if self._streams == 0:
            logger.warning(
                "engine disconnected (its snapshot stream closed): not ready until it "
                "reconnects and reports"
            )
            # what the gone engine reported no longer holds; the next one reports anew
            self.record_status(EngineStatus(connected=False))

    def record_status(self, status: EngineStatus) -> None:
        previous, self.engine = self.engine, status
        if status.reported_at is not None and (previous.state, previous.serving_etcd_revision) != (
            status.state,
            status.serving_etcd_revision,
        ):
            log = logger.warning if status.state in ("degraded", "failed") else logger.info
            log(
                "engine reports %s, serving revision %d (etcd revision %d)%s",
                status.state,
                status.serving_revision,
                status.serving_etcd_revision,
                f"; error: {status.error_message}" if status.error_message else "",
            )
        if self.metrics is not None:
            self.metrics.engine_state.state(status.state)
            self.metrics.engine_serving_revision.set(status.serving_revision)
            self.metrics.engine_connected.set(1 if status.connected else 0)
        for listener in self._listeners:
            try:
                listener(status)
            except Exception:
                logger.exception("engine status listener failed")

    def readiness(self) -> ReadinessReport:
        """Ready when a valid snapshot is held and the engine is connected (a snapshot
        stream is open) and reports serving one.

        An engine still serving the previous snapshot (it reports it is building the
        new one, or ``degraded`` because the new one failed) stays ready: readiness does
        not flap on every spec change; ``engineCurrent`` says whether it caught up.
        """
        synced = self.sync.current
        engine = self.engine
        missing: list[str] = []
        if synced is None:
            missing.append(f"snapshot: {self.sync.status()}")
        if not engine.connected:
            missing.append("engine: not connected (no snapshot stream open)")
        elif not engine.serving:
            what = f"engine: reported {engine.state}"
            if engine.error_message:
                what += f" ({engine.error_message})"
            missing.append(what)
        details: dict[str, Any] = {
            "agent": self.agent,
            "snapshot": None
            if synced is None
            else {
                "revision": synced.snapshot.revision,
                "etcdRevision": synced.etcd_revision,
                "source": synced.source,
                "status": self.sync.status(),
            },
            "engine": {
                "connected": engine.connected,
                "state": engine.state,
                "servingRevision": engine.serving_revision,
                "servingEtcdRevision": engine.serving_etcd_revision,
                "error": engine.error_message,
            },
            "engineCurrent": synced is not None
            and engine.serving_etcd_revision == synced.etcd_revision,
        }
        return ReadinessReport(ready=not missing, missing=missing, details=details)

    # ------------------------------------------------------------ server

    async def start(self) -> None:
        server = grpc.aio.server()
        sidecar_pb2_grpc.add_SpecSyncServiceServicer_to_server(_Servicer(self), server)
        if self._kind == "unix":
            await asyncio.to_thread(_clear_socket, Path(self._host))
            target = f"unix:{self._host}"
        else:
            target = format_host_port(self._host, self._port)
        try:
            port = server.add_insecure_port(target)
        except RuntimeError as e:
            raise ListenAddressError(address=self.address, reason=str(e)) from e
        if self._kind == "tcp" and port == 0:
            raise ListenAddressError(address=self.address, reason="could not bind")
        await server.start()
        self._server = server
        self.port = port if self._kind == "tcp" else None
        logger.info("spec sync service listening on %s", self.target)

    @property
    def target(self) -> str:
        """What a gRPC client dials."""
        if self._kind == "unix":
            return f"unix:{self._host}"
        return format_host_port(self._host, self.port or self._port)

    async def stop(self, grace: float | None = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None


def _resource_name_or_none(name: str) -> str | None:
    try:
        return resource_name(name)
    except ValueError:
        return None


def _clear_socket(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
