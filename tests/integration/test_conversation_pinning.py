"""Conversation pinning in the engine, end to end.

The acceptance test runs a real sidecar (sync from etcd, data plane with its egress) and a
real engine fed by the sidecar's snapshot stream (``GrpcSnapshotFeed``, as in production),
litellm to the scripted model server: a prompt version published in the Prompt Center hot
reloads the engine, and what the model server received shows which system prompt each
turn had. The maximum age is driven by an injected clock (no waiting).

The other tests stand on the pass-through egress of test_engine_runtime and a real MCP
server: an old context is kept while a conversation is pinned to it and released -- its
MCP session closed -- once the last pin leaves (expiry, deletion, the retained bound).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
from mcp.server.mcpserver import MCPServer

from engine.hot_reload import EngineRuntime
from engine.intake import InMemorySnapshotFeed
from localfleet.installer import LocalServices
from localfleet.modelserver import ScriptedModelServer
from specmesh.etcd import EtcdClient
from specmesh.keys import Keys
from specmesh.pins import MAX_PINNED_ID
from specmesh.spec.models import AgentSpec, PromptEntry
from specmesh.store import SpecStore
from tests.integration.asgi_server import serve_asgi
from tests.integration.memory_support import agent_instance, ask, scripted_model
from tests.integration.test_engine_runtime import Egress, make_snapshot, running_engine
from tests.polling import eventually

pytestmark = pytest.mark.integration

WAIT = 20.0
PIN_SECONDS = 1800.0


class Clock:
    """The engine's pin clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def model() -> AsyncIterator[ScriptedModelServer]:
    async with ScriptedModelServer() as server:  # answers "scripted: <last user message>"
        yield server


def _system_prompt_of(model: ScriptedModelServer, text: str) -> str:
    """The system prompt of the model call that carried the user message ``text``."""
    [call] = [
        r
        for r in model.requests()
        if [m for m in r.messages if m["role"] == "user"][-1]["content"] == text
    ]
    assert call.messages[0]["role"] == "system"
    return str(call.messages[0]["content"])


def _prompt(key: str, version: str) -> PromptEntry:
    return PromptEntry(
        prompt_key=key, version=version, template=f"You are the assistant of prompt {version}."
    )


async def test_a_conversation_keeps_its_system_prompt_across_a_prompt_change_until_its_age(
    services: LocalServices,
    store: SpecStore,
    etcd: EtcdClient,
    keys: Keys,
    model: ScriptedModelServer,
    tmp_path: Path,
) -> None:
    agent = f"pin-{keys.prefix.rsplit('-', 1)[-1]}"
    old_prompt, new_prompt = _prompt(agent, "1.0.0"), _prompt(agent, "1.1.0")
    await store.put_prompt_version(old_prompt, actor="t")
    spec = AgentSpec.model_validate(
        {
            "base": {"description": "pinned", "promptKey": agent},
            "model": scripted_model(model),
        }
    )
    await store.apply_agent(agent, spec, actor="t")
    clock = Clock()

    async with agent_instance(
        agent=agent,
        instance_id="i1",
        services=services,
        etcd=etcd,
        keys=keys,
        home=tmp_path,
        engine={"conversation_pin_seconds": PIN_SECONDS},
        follow=True,  # the engine on the sidecar's snapshot stream
        clock=clock,
    ) as instance:
        runtime = instance.runtime
        first = await ask(runtime, "C1 turn 1", context_id="C1")

        await store.put_prompt_version(new_prompt, actor="t")  # hot reload
        await runtime.wait_until(
            lambda r: r.context is not None and r.context.prompt.fixed == "1.1.0", timeout=WAIT
        )
        later = [await ask(runtime, f"C1 turn {n}", context_id="C1") for n in (2, 3, 4)]
        fresh = await ask(runtime, "C2 turn 1", context_id="C2")
        kept_while_pinned = len(runtime.retained_revisions)

        clock.now += PIN_SECONDS  # C1's first turn is now as old as the maximum age
        moved = await ask(runtime, "C1 turn 5", context_id="C1")
        released = runtime.retained_revisions

    old, new = old_prompt.template, new_prompt.template
    assert _system_prompt_of(model, "C1 turn 1") == old
    # the model server saw the old prompt on each of C1's next 3 turns, after the change
    assert [_system_prompt_of(model, f"C1 turn {n}") for n in (2, 3, 4)] == [old, old, old]
    assert [t.prompt_version for t in [first, *later]] == ["1.0.0"] * 4
    # a new conversation takes the new prompt
    assert _system_prompt_of(model, "C2 turn 1") == new and fresh.prompt_version == "1.1.0"
    # after the maximum age C1 moves, and the old snapshot is let go
    assert _system_prompt_of(model, "C1 turn 5") == new and moved.prompt_version == "1.1.0"
    assert kept_while_pinned == 1 and released == []


# ---------------------------------------------------------------- releasing old contexts


def _kb() -> MCPServer:
    server = MCPServer("kb")

    @server.tool()
    def lookup(key: str) -> str:
        """Look a key up."""
        return f"value-of-{key}"

    return server


@pytest.fixture
async def egress(model: ScriptedModelServer) -> AsyncIterator[Egress]:
    async with serve_asgi(_kb().streamable_http_app()) as mcp_url:
        e = Egress(model=model.root_url, mcp={"kb": f"{mcp_url}/mcp"}, a2a={})
        async with e.running():
            yield e


def _revision(number: int) -> Mapping[str, Any]:
    """Revision ``number``: its own prompt and its own MCP Registry entry (a new session)."""
    return {
        "revision": number,
        "template": f"rev-{number}",
        "registry_description": f"knowledge base, entry {number}",
    }


async def _publish(runtime: EngineRuntime, feed: InMemorySnapshotFeed, number: int) -> None:
    await feed.publish(make_snapshot(**_revision(number)))
    await runtime.wait_until(lambda r: r.revision == number, timeout=WAIT)


def engine_on(
    egress: Egress, clock: Clock, **settings: Any
) -> AbstractAsyncContextManager[tuple[EngineRuntime, InMemorySnapshotFeed]]:
    """An engine on revision 1, pins on ``clock``."""
    return running_engine(egress, make_snapshot(**_revision(1)), clock=clock, **settings)


async def _mcp_sessions(runtime: EngineRuntime, count: int) -> None:
    """Wait until ``count`` MCP sessions are open (the released contexts' are closed)."""
    await eventually(
        lambda: runtime.builder.open_mcp_connections == count,
        timeout=WAIT,
        what=f"{count} MCP sessions open",
    )


async def test_an_old_context_lives_while_pinned_and_closes_its_mcp_session_after(
    egress: Egress,
) -> None:
    clock = Clock()
    async with engine_on(egress, clock, conversation_pin_seconds=60) as (runtime, feed):
        await ask(runtime, "hello", context_id="C1")
        await ask(runtime, "hello", context_id="C3")
        await _publish(runtime, feed, 2)
        pinned = runtime.pinned_context("C1")
        both_open = runtime.builder.open_mcp_connections
        retained = runtime.retained_revisions

        assert await runtime.delete_conversation("C3")  # deleting one keeps the other's pin
        after_delete = runtime.retained_revisions
        clock.now += 60
        runtime_swept = await ask(runtime, "hello", context_id="C2")  # any turn sweeps
        await _mcp_sessions(runtime, 1)
        released = runtime.retained_revisions
        moved = await ask(runtime, "hello again", context_id="C1")

    assert pinned is not None and pinned.revision == 1
    assert both_open == 2 and retained == [1] and after_delete == [1]
    assert runtime_swept.revision == 2 and released == []
    assert moved.revision == 2


async def test_deleting_the_last_pinned_conversation_releases_its_context(egress: Egress) -> None:
    clock = Clock()
    async with engine_on(egress, clock) as (runtime, feed):
        await ask(runtime, "hello", context_id="C1")
        await _publish(runtime, feed, 2)
        kept = runtime.retained_revisions

        assert await runtime.delete_conversation("C1")
        await _mcp_sessions(runtime, 1)
        released = runtime.retained_revisions
        again = await ask(runtime, "hello", context_id="C1")

    assert kept == [1] and released == []
    assert again.revision == 2


async def test_older_contexts_kept_for_pins_are_bounded(egress: Egress) -> None:
    clock = Clock()
    async with engine_on(egress, clock, conversation_pin_max_contexts=1) as (runtime, feed):
        await ask(runtime, "hello", context_id="C1")
        await _publish(runtime, feed, 2)
        await ask(runtime, "hello", context_id="C2")
        await _publish(runtime, feed, 3)  # a third snapshot: revision 1 is one too many
        retained = runtime.retained_revisions
        await _mcp_sessions(runtime, 2)
        c1, c2 = (
            await ask(runtime, "hi", context_id="C1"),
            await ask(runtime, "hi", context_id="C2"),
        )

    assert retained == [2]
    assert (c1.revision, c2.revision) == (3, 2)


async def test_pinning_off_serves_every_turn_from_the_newest_snapshot(egress: Egress) -> None:
    clock = Clock()
    async with engine_on(egress, clock, conversation_pin_seconds=0) as (runtime, feed):
        await ask(runtime, "hello", context_id="C1")
        await _publish(runtime, feed, 2)
        turn = await ask(runtime, "hello", context_id="C1")

    assert turn.revision == 2 and runtime.pinned_conversations == 0


async def test_a_conversation_evicted_from_a_full_table_lets_its_context_go(
    egress: Egress,
) -> None:
    clock = Clock()
    async with engine_on(egress, clock, conversation_pin_max=1) as (runtime, feed):
        await ask(runtime, "hello", context_id="C1")
        await _publish(runtime, feed, 2)
        kept = runtime.retained_revisions
        await ask(runtime, "hello", context_id="C2")  # the table holds one: C1 leaves
        await _mcp_sessions(runtime, 1)
        released = runtime.retained_revisions
        moved = await ask(runtime, "hello again", context_id="C1")

    assert kept == [1] and released == []
    assert moved.revision == 2


async def test_a_context_id_longer_than_the_pinned_limit_is_served_unpinned(
    egress: Egress,
) -> None:
    clock = Clock()
    long_id = "c" * (MAX_PINNED_ID + 1)
    async with engine_on(egress, clock) as (runtime, feed):
        await ask(runtime, "hello", context_id=long_id)
        pinned = runtime.pinned_conversations
        await _publish(runtime, feed, 2)
        turn = await ask(runtime, "hello", context_id=long_id)

    assert pinned == 0  # a caller cannot fill the table with large keys
    assert turn.revision == 2
