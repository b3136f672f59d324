"""In-process memory, snapshot conversion, part fingerprints."""

from __future__ import annotations

import pytest

from engine.context import part_fingerprints
from engine.intake import SnapshotDecodeError, snapshot_from_proto, snapshot_to_proto
from engine.memory import InMemoryConversationMemory
from specmesh.snapshot import PromptBundle, ResolvedSnapshot
from specmesh.spec.models import AgentSpec, McpServerSpec, PromptEntry, ReleaseSpec


def _snapshot(template: str = "t", allowed: list[str] | None = None) -> ResolvedSnapshot:
    spec = AgentSpec.model_validate(
        {
            "base": {"description": "d", "promptKey": "p"},
            "model": {"model": "m", "apiKey": "vault://secret/a#key"},
            "mcpServers": [
                {"mcpServerName": "kb", **({"allowedTools": allowed} if allowed else {})}
            ],
            "partnerAgents": [{"agentName": "b"}],
        }
    )
    return ResolvedSnapshot(
        agent_name="a",
        revision=3,
        track="canary",
        spec=spec,
        prompt=PromptBundle(
            versions={"1": PromptEntry(prompt_key="p", version="1", template=template)}
        ),
        mcp_servers={"kb": McpServerSpec(url="http://kb:8000/mcp")},
        release=ReleaseSpec(stable_revision=2, canary_revision=3, canary_weight=10),
    )


async def test_memory_appends_gets_and_deletes_per_context() -> None:
    memory = InMemoryConversationMemory(max_messages=3)
    await memory.append("c1", [{"role": "user", "content": "1"}])
    await memory.append(
        "c1", [{"role": "assistant", "content": "2"}, {"role": "user", "content": "3"}]
    )
    await memory.append("c1", [{"role": "assistant", "content": "4"}])
    await memory.append("c2", [{"role": "user", "content": "x"}])

    assert [m["content"] for m in await memory.get("c1")] == ["2", "3", "4"]
    await memory.delete("c1")
    assert await memory.get("c1") == []
    assert len(await memory.get("c2")) == 1


def test_snapshot_survives_the_proto_round_trip() -> None:
    snapshot = _snapshot()

    assert snapshot_from_proto(snapshot_to_proto(snapshot)) == snapshot


def test_an_invalid_snapshot_message_names_the_problem() -> None:
    message = snapshot_to_proto(_snapshot())
    message.spec_json = '{"base": {"promptKey": "p"}, "model": {"model": "m"}}'

    with pytest.raises(SnapshotDecodeError) as info:
        snapshot_from_proto(message)

    assert "spec.base.description" in info.value.reason


def test_a_prompt_edit_changes_only_the_prompt_fingerprint() -> None:
    before = part_fingerprints(_snapshot("one"))
    after = part_fingerprints(_snapshot("two"))

    assert {k for k in before if before[k] != after[k]} == {"prompt"}


def test_an_allow_list_edit_keeps_the_mcp_connection_key() -> None:
    before = part_fingerprints(_snapshot(allowed=None))
    after = part_fingerprints(_snapshot(allowed=["lookup"]))

    assert before["mcp:kb"] == after["mcp:kb"]
