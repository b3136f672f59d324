"""Operations endpoints and the sidecar's Prometheus registry.

:class:`SidecarMetrics` owns one :class:`prometheus_client.CollectorRegistry`; every part
of the sidecar adds its metrics to ``metrics.registry`` (egress, router, credentials...)
and :class:`OpsServer` serves it::

    GET /healthz   200 while the process runs
    GET /readyz    200 when a valid snapshot is held and the engine is connected and
                   serves one; else 503, the JSON body says what is missing. Its ETag
                   names the report: with ``?seen=<etag>&wait=<s>`` (at most
                   :data:`MAX_READY_WAIT`) it answers once the report differs from
                   ``seen``, or after ``wait`` seconds (a watch: the supervisor's
                   readiness costs nothing while nothing changes)
    GET /metrics   Prometheus text format
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client import Enum as EnumMetric

from sidecar.errors import ListenAddressError
from specmesh.addresses import format_host_port, parse_listen
from specmesh.aio import wait_event

__all__ = ["OpsServer", "ReadinessReport", "SidecarMetrics"]

logger = logging.getLogger(__name__)


class SidecarMetrics:
    """The sidecar's metrics; other parts register theirs on :attr:`registry`."""

    def __init__(self, *, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.etcd_up = Gauge(
            "specmesh_sidecar_etcd_up",
            "1 while the last etcd call (watch or keep-alive) succeeded, else 0",
            registry=r,
        )
        self.snapshot_revision = Gauge(
            "specmesh_sidecar_snapshot_revision", "Agent revision of the held snapshot", registry=r
        )
        self.snapshot_etcd_revision = Gauge(
            "specmesh_sidecar_snapshot_etcd_revision",
            "etcd revision of the held snapshot",
            registry=r,
        )
        self.snapshot_source = EnumMetric(
            "specmesh_sidecar_snapshot_source",
            "Where the held snapshot came from",
            states=["none", "etcd", "disk_cache"],
            registry=r,
        )
        self.snapshot_updates = Counter(
            "specmesh_sidecar_snapshot_updates",
            "Snapshots pushed to the engine",
            registry=r,
        )
        self.invalid_snapshots = Counter(
            "specmesh_sidecar_invalid_snapshots",
            "Resolutions refused (the last good snapshot was kept), by kind",
            ["kind"],
            registry=r,
        )
        self.snapshot_cache_errors = Counter(
            "specmesh_sidecar_snapshot_cache_errors",
            "Failures reading or writing the on-disk snapshot",
            registry=r,
        )
        self.sync_streams = Gauge(
            "specmesh_sidecar_sync_streams", "Open WatchSnapshots streams", registry=r
        )
        self.engine_state = EnumMetric(
            "specmesh_sidecar_engine_state",
            "State the engine last reported",
            states=["unspecified", "starting", "serving", "degraded", "failed"],
            registry=r,
        )
        self.engine_serving_revision = Gauge(
            "specmesh_sidecar_engine_serving_revision",
            "Agent revision the engine reports serving",
            registry=r,
        )
        self.engine_connected = Gauge(
            "specmesh_sidecar_engine_connected",
            "1 while a snapshot stream of the engine is open (the engine is alive), else 0",
            registry=r,
        )
        self.registry_registered = Gauge(
            "specmesh_sidecar_registry_registered",
            "1 while this instance's registry entry is held under a live lease",
            registry=r,
        )
        self.registry_keepalive_failures = Counter(
            "specmesh_sidecar_registry_keepalive_failures",
            "Lease keep-alives that failed (etcd unreachable)",
            registry=r,
        )
        self.registry_registrations = Counter(
            "specmesh_sidecar_registry_registrations",
            "Lease grants + registrations (more than one: the lease expired and was renewed)",
            registry=r,
        )
        self.registry_view_instances = Gauge(
            "specmesh_sidecar_registry_view_instances",
            "Instances of all agents seen in the Agent Registry",
            registry=r,
        )


@dataclass(frozen=True)
class ReadinessReport:
    """Whether the sidecar is ready, and the facts behind it."""

    ready: bool
    missing: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"ready": self.ready, "missing": self.missing, **self.details}


MAX_READY_WAIT = 60.0
"""Longest ``wait`` a ``/readyz`` watch may ask."""
_READY_RECHECK = 2.0
"""How often a ``/readyz`` watch looks at the report between two notifications (what
:meth:`OpsServer.readiness_changed` is not told of: a first snapshot, draining)."""


def _etag(body: bytes) -> str:
    return '"' + hashlib.blake2b(body, digest_size=8).hexdigest() + '"'


class OpsServer:
    """``/healthz``, ``/readyz`` and ``/metrics`` on one aiohttp listener."""

    def __init__(
        self,
        *,
        address: str,
        metrics: SidecarMetrics,
        readiness: Callable[[], ReadinessReport],
    ) -> None:
        try:
            self._kind, self._host, self._port = parse_listen(address, setting="SPECMESH_OPS")
        except ValueError as e:
            raise ListenAddressError(address=address, reason=str(e)) from e
        self.address = address
        self.metrics = metrics
        self.readiness = readiness
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        self._changed = asyncio.Event()
        self._closing = False

    def readiness_changed(self) -> None:
        """Wake the ``/readyz`` watches: the report may have changed."""
        self._changed.set()
        self._changed = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def start(self) -> None:
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        site: web.BaseSite
        if self._kind == "unix":
            await asyncio.to_thread(Path(self._host).unlink, missing_ok=True)
            site = web.UnixSite(runner, self._host)
        else:
            site = web.TCPSite(runner, self._host, self._port)
        await site.start()
        self._runner = runner
        if self._kind == "tcp":
            server = site._server  # the asyncio server: the bound port when 0 was asked
            sockets = getattr(server, "sockets", None) or []
            self.port = int(sockets[0].getsockname()[1]) if sockets else self._port
        logger.info("ops listening on %s", self.url)

    @property
    def url(self) -> str:
        if self._kind == "unix":
            return f"unix:{self._host}"
        return f"http://{format_host_port(self._host, self.port or self._port)}"

    async def stop(self) -> None:
        self._closing = True
        self.readiness_changed()  # the watches answer now, not after their wait
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    def _report(self) -> tuple[ReadinessReport, bytes]:
        try:
            report = self.readiness()
        except Exception:
            logger.exception("readiness check failed")
            report = ReadinessReport(ready=False, missing=["readiness check raised"])
        return report, json.dumps(report.to_json()).encode()

    async def _readyz(self, request: web.Request) -> web.Response:
        report, body = self._report()
        seen = request.query.get("seen")
        try:
            wait = min(max(float(request.query.get("wait", 0)), 0.0), MAX_READY_WAIT)
        except ValueError:
            wait = 0.0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while seen == _etag(body) and not self._closing and loop.time() < deadline:
            changed = self._changed
            left = min(deadline - loop.time(), _READY_RECHECK)
            await wait_event(changed, left)
            report, body = self._report()
        return web.Response(
            body=body,
            status=200 if report.ready else 503,
            content_type="application/json",
            charset="utf-8",
            headers={"ETag": _etag(body)},
        )

    async def _metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
