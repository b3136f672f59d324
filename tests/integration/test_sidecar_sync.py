"""Spec sync against real etcd: the engine's gRPC stream, invalid values, etcd outages.

Specs hold ``vault://`` references only; a planted secret value lives in real OpenBao
and must never reach what the engine receives.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from localfleet.installer import EtcdProcess
from sidecar.ops import SidecarMetrics
from sidecar.state import SnapshotHolder
from sidecar.sync import SnapshotCache, SpecSync
from sidecar.sync_server import SpecSyncServer
from specmesh.etcd import EtcdClient
from specmesh.keys import Keys
from specmesh.secrets import VaultRef
from specmesh.snapshot import Track
from specmesh.spec.models import AgentSpec, McpServerSpec, PromptEntry, ReleaseSpec
from specmesh.store import SpecStore
from specmesh.v1 import sidecar_pb2, sidecar_pb2_grpc
from specmesh.vault import VaultClient
from tests.polling import eventually

pytestmark = pytest.mark.integration

AGENT = "sync-helper"
API_KEY_REF = "vault://secret/agents/sync-helper/model#apiKey"
MCP_TOKEN_REF = "vault://secret/agents/sync-helper/mcp-tools#token"


def _spec(temperature: float = 0.5, prompt_key: str = "sync-prompt") -> AgentSpec:
    return AgentSpec.model_validate(
        {
            "base": {"description": "sync test agent", "promptKey": prompt_key},
            "model": {
                "model": "gpt-test",
                "baseUrl": "http://127.0.0.1:9/v1",
                "apiKey": API_KEY_REF,
                "temperature": temperature,
            },
            "mcpServers": [{"mcpServerName": "tools", "headers": {"Authorization": MCP_TOKEN_REF}}],
        }
    )


def _prompt(version: str, key: str = "sync-prompt") -> PromptEntry:
    return PromptEntry(prompt_key=key, version=version, template=f"You help (v{version}).")


@dataclass
class Harness:
    sync: SpecSync
    server: SpecSyncServer
    holder: SnapshotHolder
    metrics: SidecarMetrics
    channel: grpc.aio.Channel
    stub: Any

    async def close(self) -> None:
        await self.channel.close()
        await self.server.stop(grace=0)
        await self.sync.stop()


async def _harness(
    etcd: EtcdClient,
    keys: Keys,
    *,
    track: Track = "stable",
    cache: SnapshotCache | None = None,
    agent: str = AGENT,
) -> Harness:
    holder = SnapshotHolder()
    metrics = SidecarMetrics()
    sync = SpecSync(
        etcd=etcd,
        keys=keys,
        agent=agent,
        track=track,
        holder=holder,
        cache=cache,
        metrics=metrics,
        watch_retry_max=0.2,
    )
    server = SpecSyncServer(
        address="127.0.0.1:0", agent=agent, sync=sync, holder=holder, metrics=metrics
    )
    await sync.start()
    await server.start()
    channel = grpc.aio.insecure_channel(server.target)
    return Harness(
        sync, server, holder, metrics, channel, sidecar_pb2_grpc.SpecSyncServiceStub(channel)
    )


async def _until(stream: Any, predicate: Callable[[Any], bool], timeout: float = 20) -> Any:
    """The first streamed snapshot that satisfies ``predicate`` (intermediate ones may be
    coalesced by the server, so tests look for the state they expect)."""

    async def run() -> Any:
        async for response in stream:
            if predicate(response.snapshot):
                return response.snapshot
        raise AssertionError("stream ended")

    return await asyncio.wait_for(run(), timeout)


def _temperature(snapshot: Any) -> float:
    return float(json.loads(snapshot.spec_json)["model"]["temperature"])


def _prompt_versions(snapshot: Any, key: str = "sync-prompt") -> set[str]:
    if key not in snapshot.prompts_json:
        return set()
    return set(json.loads(snapshot.prompts_json[key])["versions"])


async def _seed(store: SpecStore) -> None:
    await store.put_prompt_version(_prompt("1"), actor="t")
    await store.put_mcp_server("tools", McpServerSpec(url="http://127.0.0.1:9/mcp"), actor="t")
    await store.apply_agent(AGENT, _spec(0.5), actor="t")


# ---------------------------------------------------------------------- streaming


async def test_watch_streams_current_snapshot_then_each_change(
    store: SpecStore, etcd: EtcdClient, keys: Keys
) -> None:
    await _seed(store)
    h = await _harness(etcd, keys, track="canary")
    try:
        stream = h.stub.WatchSnapshots(sidecar_pb2.WatchSnapshotsRequest(agent_name=AGENT))
        first = await _until(stream, lambda s: True)
        assert (first.agent_name, first.revision, first.track) == (AGENT, 1, "canary")
        assert first.source == sidecar_pb2.SNAPSHOT_SOURCE_ETCD
        assert _prompt_versions(first) == {"1"} and list(first.mcp_servers_json) == ["tools"]
        assert first.release_json == "" and first.etcd_revision > 0

        # a prompt version published: a new revision, which serves it
        await store.put_prompt_version(_prompt("2"), actor="t")
        snap = await _until(stream, lambda s: s.revision == 2)
        assert _prompt_versions(snap) == {"2"}

        # a model change: a new revision
        await store.apply_agent(AGENT, _spec(0.9), actor="t")
        snap = await _until(stream, lambda s: s.revision == 3)
        assert _temperature(snap) == 0.9

        # a release for track canary: canary serves revision 4, then back to 3
        await store.apply_agent(AGENT, _spec(1.1), actor="t")
        await _until(stream, lambda s: s.revision == 4)
        await store.put_release(
            AGENT, ReleaseSpec(stable_revision=1, canary_revision=3, canary_weight=10), actor="t"
        )
        snap = await _until(stream, lambda s: s.release_json != "")
        assert snap.revision == 3 and _temperature(snap) == 0.9
        assert json.loads(snap.release_json)["canaryWeight"] == 10
        assert snap.etcd_revision == h.holder.etcd_revision
        stream.cancel()
    finally:
        await h.close()


async def test_prompt_key_change_moves_the_prompt_watch(
    store: SpecStore, etcd: EtcdClient, keys: Keys
) -> None:
    await _seed(store)
    await store.put_prompt_version(_prompt("7", key="other-prompt"), actor="t")
    h = await _harness(etcd, keys)
    try:
        stream = h.stub.WatchSnapshots(sidecar_pb2.WatchSnapshotsRequest(agent_name=AGENT))
        await _until(stream, lambda s: s.revision == 1)
        await store.apply_agent(AGENT, _spec(0.5, prompt_key="other-prompt"), actor="t")
        snap = await _until(stream, lambda s: s.revision == 2)
        # never a snapshot without its prompt: the new prompt's versions are already there
        assert dict(snap.prompts_json).keys() == {"other-prompt"}
        assert _prompt_versions(snap, "other-prompt") == {"7"}
        assert keys.prompt("other-prompt") in h.sync.watched
        assert keys.prompt("sync-prompt") not in h.sync.watched
        await store.put_prompt_version(_prompt("8", key="other-prompt"), actor="t")
        snap = await _until(stream, lambda s: s.revision == 3)
        assert _prompt_versions(snap, "other-prompt") == {"8"}
        stream.cancel()
    finally:
        await h.close()


async def test_engine_receives_references_never_secret_values(
    store: SpecStore, etcd: EtcdClient, keys: Keys, vault: VaultClient
) -> None:
    canary = f"sk-canary-{uuid.uuid4().hex}"
    await vault.write(VaultRef.parse(API_KEY_REF), canary)
    await vault.write(VaultRef.parse(MCP_TOKEN_REF), canary + "-mcp")
    await _seed(store)
    h = await _harness(etcd, keys)
    try:
        stream = h.stub.WatchSnapshots(sidecar_pb2.WatchSnapshotsRequest(agent_name=AGENT))
        streamed = await _until(stream, lambda s: True)
        stream.cancel()
        got = await h.stub.GetSnapshot(sidecar_pb2.GetSnapshotRequest(agent_name=AGENT))
        for message in (streamed, got.snapshot):
            wire = message.SerializeToString()
            assert canary.encode() not in wire
            assert API_KEY_REF.encode() in wire and MCP_TOKEN_REF.encode() in wire
        spec = json.loads(streamed.spec_json)
        assert spec["model"]["apiKey"] == API_KEY_REF
        assert spec["mcpServers"][0]["headers"]["Authorization"] == MCP_TOKEN_REF
    finally:
        await h.close()


async def test_wrong_agent_is_refused_and_no_snapshot_is_unavailable(
    etcd: EtcdClient, keys: Keys
) -> None:
    h = await _harness(etcd, keys, agent="not-applied-yet")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await h.stub.GetSnapshot(sidecar_pb2.GetSnapshotRequest(agent_name="someone-else"))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        await asyncio.wait_for(h.sync.wait_resolved(), 20)
        assert h.sync.not_found
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await h.stub.GetSnapshot(sidecar_pb2.GetSnapshotRequest(agent_name="not-applied-yet"))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "does not exist" in (info.value.details() or "")
    finally:
        await h.close()


# ---------------------------------------------------------------------- invalid values


async def test_invalid_values_are_not_pushed_and_the_last_good_stays(
    store: SpecStore, etcd: EtcdClient, keys: Keys
) -> None:
    await _seed(store)
    h = await _harness(etcd, keys)
    try:
        stream = h.stub.WatchSnapshots(sidecar_pb2.WatchSnapshotsRequest(agent_name=AGENT))
        good = await _until(stream, lambda s: s.revision == 1)
        version = h.holder.version

        def refused() -> float:
            return sum(
                s.value
                for m in h.metrics.registry.collect()
                if m.name == "specmesh_sidecar_invalid_snapshots"
                for s in m.samples
                if s.name.endswith("_total")
            )

        # 1. bad JSON for the release
        await etcd.put(keys.agent_release(AGENT), "{not json")
        await eventually(lambda: refused() >= 1, what="the bad release to be refused", timeout=20)
        assert h.holder.version == version and h.holder.current is not None
        assert h.sync.last_error is not None
        # 2. a release that does not validate (canary weight without a canary revision)
        await etcd.put(keys.agent_release(AGENT), json.dumps({"canaryWeight": 50}))
        await eventually(
            lambda: refused() >= 2, what="the invalid release to be refused", timeout=20
        )
        await etcd.delete(keys.agent_release(AGENT))
        await eventually(
            lambda: h.sync.last_error is None, what="recovery after the delete", timeout=20
        )
        # 3. a corrupted revision bundle of the served revision
        await etcd.put(keys.agent_revision(AGENT, 1), b"\x00garbage")
        await eventually(lambda: refused() >= 3, what="the bad bundle to be refused", timeout=20)
        # 4. a bad part value written raw into the bundle (temperature out of range)
        bundle = {"agent": AGENT, "revision": 1, "spec": _spec().model_dump(mode="json")}
        bundle["spec"]["model"]["temperature"] = 7
        await etcd.put(keys.agent_revision(AGENT, 1), json.dumps(bundle))
        await eventually(lambda: refused() >= 4, what="the invalid spec to be refused", timeout=20)
        assert h.sync.last_error is not None and "temperature" in h.sync.last_error.reason

        # nothing was pushed meanwhile; the engine still gets the last good snapshot
        assert h.holder.version == version
        got = await h.stub.GetSnapshot(sidecar_pb2.GetSnapshotRequest(agent_name=AGENT))
        assert got.snapshot.spec_json == good.spec_json
        assert got.snapshot.etcd_revision == good.etcd_revision

        # a valid new revision is served again
        await store.apply_agent(AGENT, _spec(0.3), actor="t")
        snap = await _until(stream, lambda s: s.revision == 2)
        assert _temperature(snap) == 0.3 and h.sync.last_error is None
        stream.cancel()
    finally:
        await h.close()


# ---------------------------------------------------------------------- etcd outages


async def test_etcd_outage_keeps_the_snapshot_and_later_updates_all_arrive(
    own_etcd: EtcdProcess, tmp_path: Path
) -> None:
    keys = Keys(prefix="/outage")
    etcd = EtcdClient(host=own_etcd.host, port=own_etcd.client_port, timeout=2)
    writer = EtcdClient(host=own_etcd.host, port=own_etcd.client_port, timeout=2)
    store = SpecStore(etcd=writer, keys=keys)
    await _seed(store)
    cache = SnapshotCache(path=tmp_path / "state" / "snapshot.json")
    h = await _harness(etcd, keys, cache=cache)
    try:
        stream = h.stub.WatchSnapshots(sidecar_pb2.WatchSnapshotsRequest(agent_name=AGENT))
        first = await _until(stream, lambda s: s.revision == 1)
        await eventually(lambda: cache.path.exists(), what="the snapshot on disk", timeout=20)

        await asyncio.to_thread(own_etcd.stop)
        # the watches notice and retry; the holder keeps its snapshot meanwhile
        await eventually(
            lambda: h.sync.watch_counters()[0] >= 1, what="a watch reconnect", timeout=20
        )
        assert h.holder.current is not None and h.holder.current.revision == 1
        got = await h.stub.GetSnapshot(sidecar_pb2.GetSnapshotRequest(agent_name=AGENT))
        assert got.snapshot.spec_json == first.spec_json

        await asyncio.to_thread(own_etcd.start)
        for v in range(2, 7):  # each a new revision of the agent (2..6), serving it
            await store.put_prompt_version(_prompt(str(v)), actor="t")
        await store.apply_agent(AGENT, _spec(1.5), actor="t")  # revision 7
        snap = await _until(
            stream, lambda s: s.revision == 7 and _prompt_versions(s) == {"6"}, timeout=30
        )
        assert _temperature(snap) == 1.5
        assert snap.source == sidecar_pb2.SNAPSHOT_SOURCE_ETCD
        stream.cancel()
        # the disk copy follows
        await eventually(
            lambda: (c := cache.load()) is not None and c[0].revision == 7,
            what="the disk snapshot at revision 7",
            timeout=20,
        )
    finally:
        await h.close()
        await etcd.close()
        await writer.close()


async def test_start_with_etcd_down_serves_the_disk_snapshot(
    own_etcd: EtcdProcess, tmp_path: Path
) -> None:
    keys = Keys(prefix="/disk")
    etcd = EtcdClient(host=own_etcd.host, port=own_etcd.client_port, timeout=2)
    store = SpecStore(etcd=etcd, keys=keys)
    await _seed(store)
    cache = SnapshotCache(path=tmp_path / "state" / "snapshot.json")
    h = await _harness(etcd, keys, cache=cache)
    try:
        await eventually(lambda: h.holder.current is not None, what="a first snapshot", timeout=20)
        await eventually(lambda: cache.path.exists(), what="the snapshot on disk", timeout=20)
        on_disk = h.sync.current
    finally:
        await h.close()
    assert on_disk is not None

    await asyncio.to_thread(own_etcd.stop)
    h = await _harness(etcd, keys, cache=cache)
    try:
        stream = h.stub.WatchSnapshots(sidecar_pb2.WatchSnapshotsRequest(agent_name=AGENT))
        snap = await _until(stream, lambda s: True)
        assert snap.source == sidecar_pb2.SNAPSHOT_SOURCE_DISK_CACHE
        assert snap.revision == 1 and snap.etcd_revision == on_disk.etcd_revision
        assert json.loads(snap.spec_json) == json.loads(
            on_disk.snapshot.spec.model_dump_json(by_alias=True)
        )

        # etcd returns with a newer revision: served from etcd
        await asyncio.to_thread(own_etcd.start)
        await store.apply_agent(AGENT, _spec(0.2), actor="t")
        snap = await _until(stream, lambda s: s.revision == 2, timeout=30)
        assert snap.source == sidecar_pb2.SNAPSHOT_SOURCE_ETCD
        stream.cancel()
    finally:
        await h.close()
        await etcd.close()
