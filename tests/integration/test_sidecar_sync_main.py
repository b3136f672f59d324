"""The whole sidecar core (settings -> Sidecar) against real etcd: start, serve, stop."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import grpc
import pytest

from sidecar.main import Sidecar, SidecarContext
from sidecar.settings import SidecarSettings
from specmesh.etcd import EtcdClient
from specmesh.keys import Keys
from specmesh.ports import free_port
from specmesh.spec.models import AgentSpec
from specmesh.store import SpecStore
from specmesh.v1 import common_pb2, sidecar_pb2, sidecar_pb2_grpc
from tests.polling import eventually

pytestmark = pytest.mark.integration


class _Recorder:
    """A plugged-in component that records its life."""

    def __init__(self, name: str, log: list[str], context: SidecarContext) -> None:
        self.name = name
        self.log = log
        self.context = context

    async def start(self) -> None:
        self.log.append(f"start {self.name}")

    async def stop(self) -> None:
        # by the time components drain, readiness is false and the registry entry is gone
        ctx = self.context
        entry = await ctx.etcd.get(
            ctx.keys.registry_instance(ctx.settings.agent_name, ctx.settings.instance_id)
        )
        self.log.append(
            f"stop {self.name} draining={ctx.draining.is_set()} registered={entry is not None}"
        )


async def test_sidecar_starts_serves_registers_and_stops_in_order(
    store: SpecStore, etcd: EtcdClient, keys: Keys, tmp_path: Path
) -> None:
    spec = AgentSpec.model_validate(
        {"base": {"description": "d", "promptKey": "p"}, "model": {"model": "m"}}
    )
    await store.apply_agent("main-helper", spec, actor="t")
    settings = SidecarSettings(
        agent_name="main-helper",
        instance_id="inst-1",
        sync_addr=f"unix:{tmp_path}/sync.sock",
        ops=f"127.0.0.1:{free_port()}",
        inbound="127.0.0.1:7999",
        home=tmp_path,
        etcd_endpoint=etcd.endpoint,
        etcd_prefix=keys.prefix,
        registry_ttl=5,
    )
    log: list[str] = []
    sidecar = Sidecar(
        settings=settings,
        component_factories=[
            lambda ctx: _Recorder("egress", log, ctx),
            lambda ctx: _Recorder("inbound", log, ctx),
        ],
    )
    await sidecar.start()
    try:
        assert log == ["start egress", "start inbound"]
        await asyncio.wait_for(sidecar.registration.wait_registered(), 20)
        entry = await etcd.get(keys.registry_instance("main-helper", "inst-1"))
        assert entry is not None
        assert json.loads(entry.value)["endpoint"] == "https://127.0.0.1:7999"

        async with grpc.aio.insecure_channel(sidecar.sync_server.target) as channel:
            stub = sidecar_pb2_grpc.SpecSyncServiceStub(channel)
            stream = stub.WatchSnapshots(
                sidecar_pb2.WatchSnapshotsRequest(agent_name="main-helper")
            )
            first = await asyncio.wait_for(stream.read(), 20)
            assert first.snapshot.revision == 1
            await stub.ReportStatus(
                sidecar_pb2.ReportStatusRequest(
                    agent_name="main-helper",
                    state=common_pb2.ENGINE_STATE_SERVING,
                    serving_revision=1,
                    serving_etcd_revision=first.snapshot.etcd_revision,
                )
            )
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://{settings.ops}/readyz") as r,
            ):
                assert r.status == 200, await r.text()

            # the registry entry follows the engine's report
            entry_json = await _entry_when(etcd, keys, "serving")
            assert entry_json["revision"] == 1

            # the engine's stream closes (the engine died): the entry says so at once
            stream.cancel()
            entry_json = await _entry_when(etcd, keys, "engine-down")
            assert entry_json["revision"] == 0
        assert sidecar.sync.current is not None
        cached = tmp_path / "sidecars" / "main-helper-stable" / "snapshot.json"
        # the last good snapshot is kept on disk
        await eventually(cached.exists, timeout=20, what="the snapshot on disk")
    finally:
        await sidecar.stop()
    assert log[2:] == [
        "stop inbound draining=True registered=False",
        "stop egress draining=True registered=False",
    ]
    assert await etcd.get(keys.registry_instance("main-helper", "inst-1")) is None


async def _entry_when(etcd: EtcdClient, keys: Keys, state: str) -> dict[str, object]:
    """The instance's registry entry once its state is ``state`` (bounded poll)."""

    async def in_state() -> dict[str, object] | None:
        entry = await etcd.get(keys.registry_instance("main-helper", "inst-1"))
        assert entry is not None
        value: dict[str, object] = json.loads(entry.value)
        return value if value["state"] == state else None

    return await eventually(in_state, timeout=20, what=f"registry state {state}")
