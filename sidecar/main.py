"""``specmesh sidecar``: run one agent instance's sidecar until SIGTERM/SIGINT.

Start order: ops (``/healthz`` answers at once), spec sync, the SpecSyncService the
engine dials, the registry view, then the pluggable components (egress, inbound...), and
last the registration (the inbound is listening by then). Shutdown runs the other way:
readiness turns false and the registry entry is revoked first (callers stop choosing this
instance), then components drain and stop in reverse order, then the sync server (open
streams get ``shutdown_grace``), the sync, ops, and the etcd client.

Components are plugged in through :func:`default_component_factories` (or the
``component_factories`` argument of :func:`run`): each factory gets the
:class:`SidecarContext` and returns an object with ``async start()`` and ``async stop()``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import aiohttp
from pydantic import ValidationError

from sidecar.ops import OpsServer, ReadinessReport, SidecarMetrics
from sidecar.registry import ENGINE_DOWN, Instance, InstanceRegistration, RegistryView
from sidecar.settings import SidecarSettings
from sidecar.state import SnapshotHolder
from sidecar.sync import SnapshotCache, SpecSync
from sidecar.sync_server import EngineStatus, SpecSyncServer
from sidecar.telemetry import configure_tracing
from specmesh.etcd import EtcdClient
from specmesh.keys import Keys
from specmesh.logs import configure_logging

__all__ = [
    "Component",
    "ComponentFactory",
    "Sidecar",
    "SidecarContext",
    "default_component_factories",
    "main",
    "run",
]

logger = logging.getLogger(__name__)


class Component(Protocol):
    """A part of the sidecar with a life: egress, inbound, credentials refresher..."""

    async def start(self) -> None: ...

    async def stop(self) -> None:
        """Drain in-flight work (bounded by the settings' ``shutdown_grace``) and stop."""
        ...


@dataclass
class SidecarContext:
    """What a component may use. Metrics go on ``metrics.registry``."""

    settings: SidecarSettings
    keys: Keys
    etcd: EtcdClient
    holder: SnapshotHolder
    metrics: SidecarMetrics
    registry_view: RegistryView
    sync: SpecSync
    sync_server: SpecSyncServer
    draining: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when shutdown begins."""


ComponentFactory = Callable[[SidecarContext], Component]


def default_component_factories() -> list[ComponentFactory]:
    """The components ``specmesh sidecar`` runs beside the core.

    The data plane (:class:`sidecar.dataplane.DataPlane`: credentials, mTLS, router,
    egress, inbound) -- one component, started after the sync and the registry view.
    """
    from sidecar.dataplane import DataPlane  # it builds on this module's context

    return [DataPlane]


class Sidecar:
    """The sidecar's parts, started and stopped in order."""

    def __init__(
        self,
        *,
        settings: SidecarSettings,
        component_factories: Sequence[ComponentFactory] = (),
        etcd: EtcdClient | None = None,
    ) -> None:
        self.settings = settings
        self.keys = settings.keys
        assert settings.etcd_endpoint is not None
        self._own_etcd = etcd is None
        self.etcd = etcd or EtcdClient.from_endpoint(
            settings.etcd_endpoint,
            timeout=settings.etcd_timeout,
            watch_timeout=settings.etcd_watch_timeout,
        )
        self.metrics = SidecarMetrics()
        self.holder = SnapshotHolder()
        self.draining = asyncio.Event()
        self.sync = SpecSync(
            etcd=self.etcd,
            keys=self.keys,
            agent=settings.agent_name,
            track=settings.track,
            holder=self.holder,
            cache=SnapshotCache(path=settings.snapshot_path),
            metrics=self.metrics,
        )
        self.sync_server = SpecSyncServer(
            address=settings.sync_addr,
            agent=settings.agent_name,
            sync=self.sync,
            holder=self.holder,
            metrics=self.metrics,
        )
        self.registry_view = RegistryView(etcd=self.etcd, keys=self.keys, metrics=self.metrics)
        self._card_revision = 0
        self._card_tasks: set[asyncio.Task[None]] = set()
        self.registration = InstanceRegistration(
            etcd=self.etcd,
            keys=self.keys,
            instance=Instance(
                instance=settings.instance_id,
                agent=settings.agent_name,
                endpoint=settings.inbound_url,
                grpc_endpoint=settings.inbound_grpc,
                ops_endpoint=settings.ops_url,
                track=settings.track,
                revision=0,
                state="starting",
                started_at=datetime.now(UTC).isoformat(),
            ),
            ttl=settings.registry_ttl,
            metrics=self.metrics,
        )
        self.sync_server.add_status_listener(self._on_engine_status)
        self.ops = OpsServer(address=settings.ops, metrics=self.metrics, readiness=self.readiness)
        self.context = SidecarContext(
            settings=settings,
            keys=self.keys,
            etcd=self.etcd,
            holder=self.holder,
            metrics=self.metrics,
            registry_view=self.registry_view,
            sync=self.sync,
            sync_server=self.sync_server,
            draining=self.draining,
        )
        self.components: list[Component] = [f(self.context) for f in component_factories]
        self._started: list[Callable[[], Awaitable[None]]] = []

    def _on_engine_status(self, status: EngineStatus) -> None:
        """The registry entry follows the engine: ``engine-down`` (revision 0) while no
        snapshot stream is open, ``starting`` while connected but not yet reported, else
        the state and revision it reports. Readiness watches are told."""
        self.ops.readiness_changed()
        if not status.connected:
            self.registration.update(revision=0, state=ENGINE_DOWN)
            return
        if status.state == "unspecified":
            self.registration.update(revision=0, state="starting")
            return
        self.registration.update(revision=status.serving_revision, state=status.state)
        if status.serving_revision and status.serving_revision != self._card_revision:
            self._card_revision = status.serving_revision
            task = asyncio.create_task(self._publish_card(status.serving_revision))
            self._card_tasks.add(task)
            task.add_done_callback(self._card_tasks.discard)

    async def _publish_card(self, revision: int) -> None:
        """Put the engine's agent card for ``revision`` into the registry entry."""
        engine = self.settings.engine_http
        url = f"{engine if '://' in engine else 'http://' + engine}/.well-known/agent-card.json"
        for _ in range(20):
            try:
                async with (
                    aiohttp.ClientSession() as http,
                    http.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r,
                ):
                    if r.status == 200:
                        card = await r.json()
                        if str(card.get("version")) == str(revision):
                            self.registration.update(card=card)
                            return
            except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                logger.debug("agent card not readable yet: %s", e)
            await asyncio.sleep(0.25)
        logger.warning("could not read the engine's agent card for revision %d", revision)

    def readiness(self) -> ReadinessReport:
        report = self.sync_server.readiness()
        if self.draining.is_set():
            return ReadinessReport(
                ready=False,
                missing=["draining: shutting down", *report.missing],
                details=report.details,
            )
        return report

    async def start(self) -> None:
        """Start every part; on failure, stop what was started and re-raise."""
        steps: list[tuple[str, Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]] = [
            ("ops", self.ops.start, self.ops.stop),
            ("spec sync", self.sync.start, self.sync.stop),
            ("sync server", self.sync_server.start, self._stop_sync_server),
            ("registry view", self.registry_view.start, self.registry_view.stop),
        ]
        steps += [(type(c).__name__, c.start, c.stop) for c in self.components]
        steps.append(("registration", self.registration.start, self.registration.stop))
        try:
            for name, start, stop in steps:
                logger.debug("starting %s", name)
                await start()
                self._started.append(stop)
        except BaseException:
            await self.stop()
            raise
        logger.info(
            "sidecar of agent %s (%s, instance %s) started",
            self.settings.agent_name,
            self.settings.track,
            self.settings.instance_id,
        )

    async def _stop_sync_server(self) -> None:
        await self.sync_server.stop(grace=self.settings.shutdown_grace)

    async def stop(self) -> None:
        """Deregister first, then drain and stop in reverse start order."""
        self.draining.set()
        self.ops.readiness_changed()
        while self._started:
            stop = self._started.pop()
            began = time.monotonic()
            try:
                await stop()
            except Exception:
                logger.exception("stopping a sidecar part failed")
            took = time.monotonic() - began
            if took > 1.0:
                logger.info("stopping %s took %.1fs", getattr(stop, "__qualname__", stop), took)
        if self._own_etcd:
            await self.etcd.close()
        logger.info("sidecar of agent %s stopped", self.settings.agent_name)


async def run(
    settings: SidecarSettings,
    *,
    component_factories: Sequence[ComponentFactory] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run until SIGTERM/SIGINT (or until ``stop`` is set)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    factories = (
        default_component_factories() if component_factories is None else component_factories
    )
    sidecar = Sidecar(settings=settings, component_factories=factories)
    await sidecar.start()
    try:
        await stop.wait()
        logger.info("shutting down")
    finally:
        await sidecar.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)


def _loop_factory(use_uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when asked for and installed, else the standard one (``None``)."""
    if not use_uvloop:
        return None
    try:
        import uvloop
    except ImportError:  # pragma: no cover - a pinned dependency; only on odd platforms
        logger.warning("SPECMESH_UVLOOP is on but uvloop is not installed; using asyncio's loop")
        return None
    return uvloop.new_event_loop


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``specmesh sidecar``: settings from the environment, logs as JSON."""
    parser = argparse.ArgumentParser(
        prog="specmesh sidecar",
        description="Run the sidecar of one agent instance (configured by AGENT_NAME and "
        "SPECMESH_* environment variables; see docs/runtime.md).",
    )
    parser.add_argument("--log-level", default=None, help="override SPECMESH_LOG_LEVEL")
    parser.add_argument("--text-logs", action="store_true", help="plain text logs, not JSON")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        settings = SidecarSettings()  # AGENT_NAME and SPECMESH_* from the environment
    except ValidationError as e:
        configure_logging(level="INFO", json_format=not args.text_logs)
        for err in e.errors():
            where = ".".join(str(p) for p in err.get("loc", ())) or "settings"
            logger.error("bad sidecar setting %s: %s", where, err.get("msg"))
        return 2
    configure_logging(level=args.log_level or settings.log_level, json_format=not args.text_logs)
    provider = configure_tracing(
        agent=settings.agent_name,
        track=settings.track,
        endpoint=settings.otel_exporter_otlp_endpoint,
    )
    try:
        with asyncio.Runner(loop_factory=_loop_factory(settings.uvloop)) as runner:
            runner.run(run(settings))
    except KeyboardInterrupt:
        return 130
    except Exception:
        logger.exception("sidecar failed")
        return 1
    finally:
        if provider is not None:
            provider.shutdown()  # flush the last spans
    return 0
