"""The on-disk snapshot cache and the ResolvedSnapshot -> proto conversion."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sidecar.errors import SnapshotCacheError
from sidecar.sync import SnapshotCache, SyncedSnapshot
from sidecar.sync_server import snapshot_to_proto
from specmesh.snapshot import PromptBundle, ResolvedSnapshot
from specmesh.spec.models import AgentSpec, McpServerSpec, PromptEntry, ReleaseSpec
from specmesh.v1 import sidecar_pb2

REF = "vault://secret/agents/helper/model#apiKey"


def _snapshot(release: ReleaseSpec | None = None) -> ResolvedSnapshot:
    spec = AgentSpec.model_validate(
        {
            "base": {"description": "d", "promptKey": "helper-prompt"},
            "model": {"model": "m", "apiKey": REF, "maxTokens": 100},
            "mcpServers": [{"mcpServerName": "tools", "headers": {"X-Key": REF}}],
        }
    )
    return ResolvedSnapshot(
        agent_name="helper",
        revision=3,
        track="stable",
        spec=spec,
        prompt=PromptBundle(
            versions={
                "1": PromptEntry(prompt_key="helper-prompt", version="1", template="Hi {{x}}")
            }
        ),
        mcp_servers={"tools": McpServerSpec(url="http://127.0.0.1:9/mcp")},
        release=release,
    )


def test_cache_round_trip_is_atomic(tmp_path: Path) -> None:
    cache = SnapshotCache(path=tmp_path / "state" / "snapshot.json")
    assert cache.load() is None
    cache.save(_snapshot(), 42)
    cache.save(_snapshot(ReleaseSpec(stable_revision=3)), 43)
    snapshot, revision = cache.load() or (None, 0)
    assert revision == 43 and snapshot == _snapshot(ReleaseSpec(stable_revision=3))
    assert os.listdir(cache.path.parent) == ["snapshot.json"]  # no temp file left behind


def test_cache_refuses_a_corrupt_file(tmp_path: Path) -> None:
    cache = SnapshotCache(path=tmp_path / "snapshot.json")
    cache.path.write_text('{"etcdRevision": 1, "snapshot": {"agentName": "x"}}')
    with pytest.raises(SnapshotCacheError, match="unreadable"):
        cache.load()
    cache.path.write_text("not json")
    with pytest.raises(SnapshotCacheError):
        cache.load()


def test_proto_carries_each_part_as_camel_case_json() -> None:
    produced = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
    release = ReleaseSpec(stable_revision=2, canary_revision=3, canary_weight=10)
    msg = snapshot_to_proto(
        SyncedSnapshot(
            snapshot=_snapshot(release), etcd_revision=99, source="disk_cache", produced_at=produced
        )
    )
    assert (msg.agent_name, msg.revision, msg.etcd_revision, msg.track) == (
        "helper",
        3,
        99,
        "stable",
    )
    assert msg.source == sidecar_pb2.SNAPSHOT_SOURCE_DISK_CACHE
    assert msg.produced_at.ToDatetime(tzinfo=UTC) == produced
    spec = json.loads(msg.spec_json)
    assert spec["model"]["apiKey"] == REF and spec["model"]["maxTokens"] == 100
    assert AgentSpec.model_validate_json(msg.spec_json) == _snapshot().spec
    prompt = json.loads(msg.prompts_json["helper-prompt"])
    assert prompt["versions"]["1"]["promptKey"] == "helper-prompt"
    assert json.loads(msg.mcp_servers_json["tools"])["url"] == "http://127.0.0.1:9/mcp"
    assert json.loads(msg.release_json)["canaryWeight"] == 10
    assert snapshot_to_proto(SyncedSnapshot(_snapshot(), 1, "etcd", produced)).release_json == ""
