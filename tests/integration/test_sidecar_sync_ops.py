"""Readiness, health and metrics over HTTP, with real etcd and the engine's gRPC report."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import pytest

from sidecar.ops import OpsServer, SidecarMetrics
from sidecar.state import SnapshotHolder
from sidecar.sync import SpecSync
from sidecar.sync_server import SpecSyncServer
from specmesh.etcd import EtcdClient
from specmesh.keys import Keys
from specmesh.spec.models import AgentSpec
from specmesh.store import SpecStore
from specmesh.v1 import common_pb2, sidecar_pb2, sidecar_pb2_grpc
from tests.polling import eventually

pytestmark = pytest.mark.integration

AGENT = "ops-helper"


@dataclass
class _Parts:
    """The sidecar's sync, its gRPC sync server and its ops server, for one agent."""

    sync: SpecSync
    server: SpecSyncServer
    ops: OpsServer


def _parts(etcd: EtcdClient, keys: Keys, agent: str) -> _Parts:
    holder = SnapshotHolder()
    metrics = SidecarMetrics()
    sync = SpecSync(
        etcd=etcd, keys=keys, agent=agent, track="stable", holder=holder, metrics=metrics
    )
    server = SpecSyncServer(
        address="127.0.0.1:0", agent=agent, sync=sync, holder=holder, metrics=metrics
    )
    ops = OpsServer(address="127.0.0.1:0", metrics=metrics, readiness=server.readiness)
    return _Parts(sync, server, ops)


@asynccontextmanager
async def _started(
    parts: _Parts,
) -> AsyncIterator[tuple[sidecar_pb2_grpc.SpecSyncServiceStub, aiohttp.ClientSession]]:
    """Start ops, sync and server; the engine's stub and an HTTP session on the ops port."""
    await parts.ops.start()
    await parts.sync.start()
    await parts.server.start()
    channel = grpc.aio.insecure_channel(parts.server.target)
    try:
        async with aiohttp.ClientSession(base_url=parts.ops.url) as http:
            yield sidecar_pb2_grpc.SpecSyncServiceStub(channel), http
    finally:
        await channel.close()
        await parts.server.stop(grace=0)
        await parts.sync.stop()
        await parts.ops.stop()


async def test_readyz_turns_ready_after_snapshot_and_engine_serving(
    store: SpecStore, etcd: EtcdClient, keys: Keys
) -> None:
    parts = _parts(etcd, keys, AGENT)
    sync = parts.sync
    async with _started(parts) as (stub, http):
        async with http.get("/healthz") as r:
            assert r.status == 200

        # no agent yet: not ready, and the body says why
        await asyncio.wait_for(sync.wait_resolved(), 20)
        async with http.get("/readyz") as r:
            body = await r.json()
            assert r.status == 503 and not body["ready"]
            assert any("does not exist" in m for m in body["missing"])

        spec = AgentSpec.model_validate(
            {"base": {"description": "d", "promptKey": "p"}, "model": {"model": "m"}}
        )
        await store.apply_agent(AGENT, spec, actor="t")
        await eventually(
            lambda: _nothing_but_engine_missing(http), timeout=20, what="the readyz answer"
        )

        # a report without an open snapshot stream counts for nothing: no engine is
        # connected
        snap = (await stub.GetSnapshot(sidecar_pb2.GetSnapshotRequest(agent_name=AGENT))).snapshot
        serving = sidecar_pb2.ReportStatusRequest(
            agent_name=AGENT,
            state=common_pb2.ENGINE_STATE_SERVING,
            serving_revision=snap.revision,
            serving_etcd_revision=snap.etcd_revision,
        )
        await stub.ReportStatus(serving)
        async with http.get("/readyz") as r:
            body = await r.json()
            assert r.status == 503 and body["engine"]["connected"] is False
            assert body["missing"] == ["engine: not connected (no snapshot stream open)"]

        # the engine's stream is open and it reports it serves the snapshot: ready
        stream = stub.WatchSnapshots(sidecar_pb2.WatchSnapshotsRequest(agent_name=AGENT))
        await asyncio.wait_for(stream.read(), 20)
        await stub.ReportStatus(
            sidecar_pb2.ReportStatusRequest(
                agent_name=AGENT,
                state=common_pb2.ENGINE_STATE_SERVING,
                serving_revision=snap.revision,
                serving_etcd_revision=snap.etcd_revision,
            )
        )
        async with http.get("/readyz") as r:
            body = await r.json()
            assert r.status == 200 and body["ready"], body
            assert body["engineCurrent"] is True
            assert body["engine"]["servingRevision"] == 1

        # a failed engine is not ready
        await stub.ReportStatus(
            sidecar_pb2.ReportStatusRequest(
                agent_name=AGENT,
                state=common_pb2.ENGINE_STATE_FAILED,
                error_message="model client could not be built",
            )
        )
        async with http.get("/readyz") as r:
            body = await r.json()
            assert r.status == 503
            assert any("model client could not be built" in m for m in body["missing"])

        async with http.get("/metrics") as r:
            text = await r.text()
            assert r.status == 200
            for name in (
                "specmesh_sidecar_engine_connected 1.0",
                "specmesh_sidecar_snapshot_revision 1.0",
                "specmesh_sidecar_etcd_watch_reconnects_total",
                "specmesh_sidecar_etcd_watch_resets_total",
                "specmesh_sidecar_etcd_watch_stalls_total",
                "specmesh_sidecar_invalid_snapshots",
                'specmesh_sidecar_engine_state{specmesh_sidecar_engine_state="failed"} 1.0',
                'specmesh_sidecar_snapshot_source{specmesh_sidecar_snapshot_source="etcd"} 1.0',
            ):
                assert name in text, name

        # serving again, then the engine's stream closes (its process died): not ready,
        # and what it reported is forgotten
        await stub.ReportStatus(serving)
        async with http.get("/readyz") as r:
            assert r.status == 200
        stream.cancel()
        body = await eventually(lambda: _readyz_if(http, 503), timeout=20, what="the readyz answer")
        assert body["missing"] == ["engine: not connected (no snapshot stream open)"]
        assert body["engine"]["state"] == "unspecified"
        assert body["engine"]["servingRevision"] == 0
        async with http.get("/metrics") as r:
            assert "specmesh_sidecar_engine_connected 0.0" in await r.text()


async def _nothing_but_engine_missing(http: aiohttp.ClientSession) -> bool:
    async with http.get("/readyz") as r:
        body = await r.json()
        return r.status == 503 and [m.split(":")[0] for m in body["missing"]] == ["engine"]


async def _readyz_if(http: aiohttp.ClientSession, status: int) -> dict[str, Any] | None:
    async with http.get("/readyz") as r:
        return dict(await r.json()) if r.status == status else None


async def test_a_readyz_watch_answers_when_the_report_changes(
    store: SpecStore, etcd: EtcdClient, keys: Keys
) -> None:
    agent = "ops-watched"
    parts = _parts(etcd, keys, agent)
    ops = parts.ops
    parts.server.add_status_listener(lambda _: ops.readiness_changed())  # as the sidecar wires it
    spec = AgentSpec.model_validate(
        {"base": {"description": "d", "promptKey": "p"}, "model": {"model": "m"}}
    )
    await store.apply_agent(agent, spec, actor="t")
    async with _started(parts) as (stub, http):
        await eventually(
            lambda: _nothing_but_engine_missing(http), timeout=20, what="the readyz answer"
        )
        async with http.get("/readyz") as r:
            etag = r.headers["ETag"]
        # a watch on a report already different answers at once
        async with http.get("/readyz", params={"seen": '"other"', "wait": "60"}) as r:
            assert r.status == 503 and r.headers["ETag"] == etag

        # a watch on the current report answers once the engine connects (not after
        # its wait)
        watch = asyncio.create_task(http.get("/readyz", params={"seen": etag, "wait": "60"}))
        stream = stub.WatchSnapshots(sidecar_pb2.WatchSnapshotsRequest(agent_name=agent))
        await asyncio.wait_for(stream.read(), 20)
        r = await asyncio.wait_for(watch, 20)
        body = await r.json()
        assert r.headers["ETag"] != etag and body["engine"]["connected"] is True
        stream.cancel()
