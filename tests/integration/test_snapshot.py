"""Snapshot resolution from the keys a sidecar watches (real etcd)."""

from __future__ import annotations

import pytest

from specmesh.etcd import EtcdClient
from specmesh.keys import Keys
from specmesh.snapshot import resolve_snapshot, watched_prefixes
from specmesh.spec.models import AgentSpec, McpServerSpec, PromptEntry, ReleaseSpec
from specmesh.store import SpecStore

pytestmark = pytest.mark.integration


def _spec(t: float) -> AgentSpec:
    return AgentSpec.model_validate(
        {
            "base": {"description": "d", "promptKey": "helper-prompt"},
            "model": {"model": "m", "temperature": t},
            "mcpServers": [{"mcpServerName": "tools"}, {"mcpServerName": "unregistered"}],
        }
    )


async def _kvs(etcd: EtcdClient, keys: Keys) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for prefix in watched_prefixes(keys, "helper", "helper-prompt"):
        for kv in (await etcd.range(prefix, prefix=True)).kvs:
            out[kv.key] = kv.value
    return out


async def test_tracks_serve_release_revisions_with_prompt_and_mcp(
    store: SpecStore, etcd: EtcdClient, keys: Keys
) -> None:
    await store.put_prompt_version(
        PromptEntry(prompt_key="helper-prompt", version="1", template="You help."), actor="a"
    )
    await store.put_mcp_server("tools", McpServerSpec(url="http://127.0.0.1:9/mcp"), actor="a")
    for t in (0.1, 0.2, 0.3):
        await store.apply_agent("helper", _spec(t), actor="a")

    latest = resolve_snapshot(await _kvs(etcd, keys), keys=keys, agent="helper", track="canary")
    assert (latest.revision, latest.spec.model.temperature) == (3, 0.3)
    assert list(latest.prompt.versions) == ["1"] and list(latest.mcp_servers) == ["tools"]

    await store.put_release(
        "helper", ReleaseSpec(stable_revision=1, canary_revision=2, canary_weight=10), actor="a"
    )
    kvs = await _kvs(etcd, keys)
    stable = resolve_snapshot(kvs, keys=keys, agent="helper", track="stable")
    canary = resolve_snapshot(kvs, keys=keys, agent="helper", track="canary")
    assert (stable.revision, stable.spec.model.temperature) == (1, 0.1)
    assert (canary.revision, canary.spec.model.temperature) == (2, 0.2)
