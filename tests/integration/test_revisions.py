"""Revisions that pin what they ran with: the resolved prompt versions and MCP Registry
entries, new revisions when they change, rollback of agents and prompts (real etcd)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from specmesh.errors import ConflictError, NotFoundError
from specmesh.etcd import EtcdClient
from specmesh.keys import Keys
from specmesh.snapshot import resolve_snapshot, watched_prefixes
from specmesh.spec.models import AgentSpec, McpServerSpec, PromptEntry, PromptRelease, ReleaseSpec
from specmesh.store import SpecStore

pytestmark = pytest.mark.integration


def _spec(prompt: str = "helper", t: float = 0.5, **base: Any) -> AgentSpec:
    return AgentSpec.model_validate(
        {
            "base": {"description": "d", "promptKey": prompt, **base},
            "model": {"model": "scripted", "temperature": t},
            "mcpServers": [{"mcpServerName": "tools"}],
        }
    )


async def _publish(store: SpecStore, *versions: str, key: str = "helper") -> None:
    for v in versions:
        entry = PromptEntry(prompt_key=key, version=v, template=f"You are v{v}.")
        await store.put_prompt_version(entry, actor="pat")


async def _snapshot(etcd: EtcdClient, keys: Keys, agent: str, track: str = "stable") -> Any:
    kvs: dict[str, bytes] = {}
    for prefix in watched_prefixes(keys, agent, "helper"):
        kvs.update({kv.key: kv.value for kv in (await etcd.range(prefix, prefix=True)).kvs})
    return resolve_snapshot(kvs, keys=keys, agent=agent, track=track)  # type: ignore[arg-type]


async def test_revision_records_resolved_prompt_and_mcp_entries(store: SpecStore) -> None:
    await _publish(store, "1.0.0", "1.2.0", "1.10.0")
    await store.put_mcp_server("tools", McpServerSpec(url="http://127.0.0.1:9/mcp"), actor="m")

    await store.apply_agent("helper", _spec(), actor="alice")

    record = await store.get_agent("helper")
    assert record.resolved == {
        "prompt": {"key": "helper", "versions": ["1.10.0"]},
        "mcpServers": {
            "tools": McpServerSpec(url="http://127.0.0.1:9/mcp").model_dump(mode="json")
        },
    }


async def test_prompt_change_writes_revisions_only_of_agents_whose_resolution_changes(
    store: SpecStore,
) -> None:
    await _publish(store, "1.0.0")
    await _publish(store, "1", key="other")
    await store.set_prompt_release("helper", PromptRelease(labels={"prod": "1.0.0"}), actor="p")
    await store.apply_agent("latest", _spec(), actor="a")
    await store.apply_agent("pinned", _spec(promptVersion="1.0.0"), actor="a")
    await store.apply_agent("labelled", _spec(promptLabel="prod"), actor="a")
    await store.apply_agent("elsewhere", _spec("other"), actor="a")

    await _publish(store, "1.1.0")

    revisions = {a.name: a.revision for a in await store.list_agents()}
    assert revisions == {"latest": 2, "pinned": 1, "labelled": 1, "elsewhere": 1}
    latest = await store.get_agent("latest")
    assert (latest.action, latest.author) == ("prompt", "pat")
    assert latest.message == "prompt helper version 1.1.0"
    assert latest.resolved and latest.resolved["prompt"]["versions"] == ["1.1.0"]
    audit = (await store.audit_entries(name="latest"))[0]
    assert (audit.action, audit.revision) == ("prompt", 2)
    assert [c["path"] for c in audit.changes] == ["resolved.prompt.versions[0]"]

    split = PromptRelease(labels={"prod": "1.1.0"}, weights={"1.0.0": 90, "1.1.0": 10})
    await store.set_prompt_release("helper", split, actor="p", message="try 1.1.0")

    revisions = {a.name: a.revision for a in await store.list_agents()}
    assert revisions == {"latest": 3, "pinned": 1, "labelled": 2, "elsewhere": 1}
    latest = await store.get_agent("latest")
    assert latest.resolved and latest.resolved["prompt"] == {
        "key": "helper",
        "weights": {"1.0.0": 90, "1.1.0": 10},
    }
    assert latest.message == "prompt helper release: try 1.1.0"
    labelled = await store.get_agent("labelled")
    assert labelled.resolved and labelled.resolved["prompt"]["versions"] == ["1.1.0"]

    # the same release again changes nothing, so no agent gets a revision
    await store.set_prompt_release("helper", split, actor="p")
    assert {a.name: a.revision for a in await store.list_agents()} == revisions


async def test_mcp_entry_change_writes_revisions_of_agents_using_it(store: SpecStore) -> None:
    await _publish(store, "1.0.0")
    await store.put_mcp_server("tools", McpServerSpec(url="http://127.0.0.1:9/mcp"), actor="m")
    await store.apply_agent("user", _spec(), actor="a")
    await store.apply_agent(
        "nonuser",
        AgentSpec.model_validate(
            {"base": {"description": "d", "promptKey": "helper"}, "model": {"model": "m"}}
        ),
        actor="a",
    )

    await store.put_mcp_server("tools", McpServerSpec(url="http://127.0.0.1:8/mcp"), actor="m")

    user = await store.get_agent("user")
    assert (user.revision, user.action, user.message) == (2, "mcp", "MCP server tools")
    assert user.resolved and user.resolved["mcpServers"]["tools"]["url"] == "http://127.0.0.1:8/mcp"
    assert (await store.get_agent("nonuser")).revision == 1


async def test_snapshot_serves_the_recorded_resolution_not_the_live_one(
    store: SpecStore, etcd: EtcdClient, keys: Keys
) -> None:
    await _publish(store, "1.0.0")
    await store.put_mcp_server("tools", McpServerSpec(url="http://127.0.0.1:9/mcp"), actor="m")
    await store.apply_agent("helper", _spec(), actor="a")
    await store.put_release("helper", ReleaseSpec(stable_revision=1), actor="r")

    await _publish(store, "1.1.0")  # revision 2
    await store.put_mcp_server("tools", McpServerSpec(url="http://127.0.0.1:8/mcp"), actor="m")

    stable = await _snapshot(etcd, keys, "helper")
    assert stable.revision == 1
    assert list(stable.prompt.versions) == ["1.0.0"]
    assert stable.prompt.release == PromptRelease(current="1.0.0")
    assert stable.mcp_servers["tools"].url == "http://127.0.0.1:9/mcp"
    await store.put_release("helper", ReleaseSpec(), actor="r")
    latest = await _snapshot(etcd, keys, "helper")
    assert latest.revision == 3 and list(latest.prompt.versions) == ["1.1.0"]
    assert latest.mcp_servers["tools"].url == "http://127.0.0.1:8/mcp"


async def test_snapshot_of_a_revision_without_resolved_serves_the_live_prompt_and_mcp(
    store: SpecStore, etcd: EtcdClient, keys: Keys
) -> None:
    await _publish(store, "1.0.0", "1.1.0")
    await store.put_mcp_server("tools", McpServerSpec(url="http://127.0.0.1:9/mcp"), actor="m")
    await store.set_prompt_release("helper", PromptRelease(labels={"prod": "1.0.0"}), actor="p")
    await store.apply_agent("helper", _spec(), actor="a")
    # a revision as written before revisions recorded what they resolved
    key = keys.agent_revision("helper", 1)
    legacy = json.loads((await etcd.range(key)).kvs[0].value)
    del legacy["resolved"]
    await etcd.put(key, json.dumps(legacy))

    snapshot = await _snapshot(etcd, keys, "helper")

    assert sorted(snapshot.prompt.versions) == ["1.0.0", "1.1.0"]
    assert snapshot.prompt.release == PromptRelease(labels={"prod": "1.0.0"})
    assert snapshot.mcp_servers["tools"].url == "http://127.0.0.1:9/mcp"


async def test_agent_rollback_restores_the_recorded_prompt_version(
    store: SpecStore, etcd: EtcdClient, keys: Keys
) -> None:
    await _publish(store, "1.0.0")
    await store.apply_agent("helper", _spec(t=0.1), actor="a")
    await _publish(store, "1.1.0")
    await store.apply_agent("helper", _spec(t=0.2), actor="a")

    result = await store.rollback("helper", 1, actor="bob")

    first, rolled = await store.get_agent("helper", 1), await store.get_agent("helper")
    assert rolled.revision == result.revision == 4
    assert (rolled.spec, rolled.resolved) == (first.spec, first.resolved)
    assert rolled.resolved and rolled.resolved["prompt"]["versions"] == ["1.0.0"]
    snapshot = await _snapshot(etcd, keys, "helper")
    assert (snapshot.revision, list(snapshot.prompt.versions)) == (4, ["1.0.0"])


async def test_prompt_rollback_serves_the_version_again_and_is_audited(
    store: SpecStore,
) -> None:
    await _publish(store, "1.0.0", "1.1.0")
    weights = PromptRelease(labels={"prod": "1.1.0"}, weights={"1.0.0": 50, "1.1.0": 50})
    await store.set_prompt_release("helper", weights, actor="p")
    await store.apply_agent("helper", _spec(), actor="a")

    release = await store.rollback_prompt("helper", "1.0.0", actor="olga", message="bad tone")

    assert release == PromptRelease(labels={"prod": "1.1.0"}, current="1.0.0")
    assert await store.get_prompt_release("helper") == release
    agent = await store.get_agent("helper")
    assert (agent.revision, agent.action) == (2, "prompt")
    assert agent.message == "prompt helper rolled back to 1.0.0: bad tone"
    assert agent.resolved and agent.resolved["prompt"]["versions"] == ["1.0.0"]
    entry = next(e for e in await store.audit_entries(kind="Prompt") if e.name == "helper")
    assert (entry.action, entry.actor, entry.message) == (
        "rollback",
        "olga",
        "rollback to 1.0.0: bad tone",
    )
    with pytest.raises(NotFoundError):
        await store.rollback_prompt("helper", "9.9.9", actor="olga")
    with pytest.raises(NotFoundError):
        await store.rollback_prompt("nothing", "1.0.0", actor="olga")


async def test_a_prompt_release_written_from_a_stale_read_is_a_conflict(
    store: SpecStore, etcd: EtcdClient, keys: Keys
) -> None:
    # rollback_prompt reads the release, then writes it back with `current` changed: a
    # label set in between must be a conflict, never silently lost
    await _publish(store, "1.0.0", "1.1.0")
    await store.set_prompt_release("helper", PromptRelease(labels={"prod": "1.0.0"}), actor="p")
    read = await etcd.get(keys.prompt_release("helper"))
    assert read is not None
    await store.set_prompt_release("helper", PromptRelease(labels={"prod": "1.1.0"}), actor="q")

    with pytest.raises(ConflictError):
        await store._put_with_audit(
            keys.prompt_release("helper"),
            PromptRelease(labels={"prod": "1.0.0"}, current="1.0.0").model_dump(mode="json"),
            actor="olga",
            kind="Prompt",
            name="helper",
            action="rollback",
            read_mod_revision=read.mod_revision,
        )
    assert await store.get_prompt_release("helper") == PromptRelease(labels={"prod": "1.1.0"})


async def test_prompt_history_lists_versions_and_release_changes(store: SpecStore) -> None:
    await _publish(store, "1.0.0", "1.1.0")
    await _publish(store, "1", key="helper-two")  # a longer key with the same start
    await store.set_prompt_release("helper", PromptRelease(labels={"prod": "1.1.0"}), actor="p")
    await store.rollback_prompt("helper", "1.0.0", actor="olga")

    history = await store.prompt_history("helper")

    assert [v.version for v in history.versions] == ["1.0.0", "1.1.0"]
    assert {v: e.actor for v, e in history.published.items()} == {"1.0.0": "pat", "1.1.0": "pat"}
    assert [(e.kind, e.action, e.actor) for e in history.release_changes] == [
        ("PromptRelease", "apply", "p"),
        ("Prompt", "rollback", "olga"),
    ]
    with pytest.raises(NotFoundError):
        await store.prompt_history("nothing")


async def test_a_change_the_dependents_missed_is_caught_up_by_the_next_write(
    store: SpecStore,
) -> None:
    await _publish(store, "1.0.0")
    await store.apply_agent("helper", _spec(), actor="a")
    # the control plane died after publishing, before it wrote the agent's new revision
    entry = PromptEntry(prompt_key="helper", version="1.1.0", template="You are v1.1.0.")
    await store.put_prompt_version(entry, actor="pat", refresh=False)
    assert (await store.get_agent("helper")).revision == 1

    assert await store.put_prompt_version(entry, actor="pat") is False  # the same command again

    agent = await store.get_agent("helper")
    assert agent.revision == 2 and agent.resolved
    assert agent.resolved["prompt"]["versions"] == ["1.1.0"]
