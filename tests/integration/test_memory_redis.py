"""Redis memory across instances, through the sidecar's Redis proxy: real redis-server with a
password kept in OpenBao, real sidecars (DataPlane) in-process, real engines, litellm to the
scripted model server. The engine never holds the Redis password."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, ResponseError
from starlette.applications import Starlette

from engine.errors import MemoryStoreError
from engine.memory import RedisConversationMemory, memory_key
from engine.rest import create_business_routes
from localfleet.installer import LocalServices, RedisProcess
from localfleet.modelserver import ScriptedModelServer
from specmesh.etcd import EtcdClient
from specmesh.keys import Keys
from specmesh.store import SpecStore
from specmesh.vault import VaultClient

from .memory_support import (
    REDIS_PASSWORD,
    Instance,
    agent_instance,
    apply_agent,
    ask,
    password_ref,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def model() -> AsyncIterator[ScriptedModelServer]:
    async with ScriptedModelServer(script={"rules": []}) as server:
        yield server


@pytest.fixture
async def direct(redis_server: RedisProcess) -> AsyncIterator[aioredis.Redis]:
    """The test's own view of the store (with the password): to check keys and TTLs."""
    client = aioredis.Redis(
        host=redis_server.host,
        port=redis_server.port,
        password=REDIS_PASSWORD,
        decode_responses=True,
    )
    yield client
    await client.aclose()


def memory_snapshot_json(inst: Instance) -> str:
    context = inst.runtime.context
    assert context is not None
    return context.snapshot.model_dump_json()


async def test_a_conversation_continues_on_a_second_instance(
    services: LocalServices,
    store: SpecStore,
    etcd: EtcdClient,
    keys: Keys,
    vault: VaultClient,
    model: ScriptedModelServer,
    redis_server: RedisProcess,
    direct: aioredis.Redis,
    tmp_path: Path,
) -> None:
    agent = f"mem-{keys.prefix.rsplit('-', 1)[-1]}"
    await apply_agent(store, vault, agent=agent, model=model, redis=redis_server)
    common = {"agent": agent, "services": services, "etcd": etcd, "keys": keys}

    async with (
        agent_instance(instance_id="i1", home=tmp_path / "i1", **common) as first,
        agent_instance(instance_id="i2", home=tmp_path / "i2", **common) as second,
    ):
        one = await ask(first.runtime, "My ticket number is 4711.", context_id="conv-1")
        model.clear_requests()
        two = await ask(second.runtime, "What is my ticket number?", context_id="conv-1")

        # the second instance sent the first's history to the model
        (request,) = model.requests()
        assert [(m["role"], m["content"]) for m in request.messages] == [
            ("system", "You are a helpful assistant."),
            ("user", "My ticket number is 4711."),
            ("assistant", one.text),
            ("user", "What is my ticket number?"),
        ]
        assert two.text == "scripted: What is my ticket number?"

        # one Redis list per conversation, JSON turns, TTL from the spec, refreshed on write
        key = memory_key(agent, "conv-1")
        stored = [json.loads(x) for x in await direct.lrange(key, 0, -1)]
        assert [(t["role"], t["content"]) for t in stored][-2:] == [
            ("user", "What is my ticket number?"),
            ("assistant", two.text),
        ]
        assert all(isinstance(t["ts"], float) for t in stored)
        assert 0 < await direct.ttl(key) <= 600

        # the engine holds no password: its client has none, its snapshot only a reference
        memory = second.runtime.context.memory if second.runtime.context else None
        assert isinstance(memory, RedisConversationMemory)
        kwargs = memory.client.connection_pool.connection_kwargs
        assert kwargs.get("password") is None
        assert f"{kwargs['host']}:{kwargs['port']}" == second.proxy_address
        snapshot_json = memory_snapshot_json(second)
        assert REDIS_PASSWORD not in snapshot_json and "vault://" in snapshot_json
        # ...and the store really needs one: without the proxy, no access
        bare = aioredis.Redis(host=redis_server.host, port=redis_server.port)
        with pytest.raises((AuthenticationError, ResponseError)):
            await bare.get(key)
        await bare.aclose()

        # DELETE /v1/conversations/{contextId} on the business REST forgets it everywhere
        app = Starlette(routes=create_business_routes(runner=first.runtime))
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://engine"
        ) as http:
            gone = await http.delete("/v1/conversations/conv-1")
            again = await http.delete("/v1/conversations/conv-1")
        assert gone.status_code == 204
        assert again.status_code == 404
        assert again.json()["error"]["code"] == "not_found"
        assert await direct.exists(key) == 0
        model.clear_requests()
        await ask(second.runtime, "Hello again", context_id="conv-1")
        (fresh,) = model.requests()
        assert [m["role"] for m in fresh.messages] == ["system", "user"]


async def test_the_proxy_refuses_when_the_password_in_vault_is_wrong(
    services: LocalServices,
    store: SpecStore,
    etcd: EtcdClient,
    keys: Keys,
    vault: VaultClient,
    model: ScriptedModelServer,
    redis_server: RedisProcess,
    tmp_path: Path,
) -> None:
    agent = f"memx-{keys.prefix.rsplit('-', 1)[-1]}"
    await apply_agent(store, vault, agent=agent, model=model, redis=redis_server)
    await vault.write(password_ref(agent), "not-the-password")
    async with agent_instance(
        agent=agent,
        instance_id="i1",
        services=services,
        etcd=etcd,
        keys=keys,
        home=tmp_path / "i1",
    ) as inst:
        memory = inst.runtime.context.memory if inst.runtime.context else None
        assert isinstance(memory, RedisConversationMemory)
        with pytest.raises(MemoryStoreError) as caught:
            async with asyncio.timeout(10):
                await memory.get("c")
        assert "auth_refused" in caught.value.reason
        assert "not-the-password" not in str(caught.value)
        assert inst.dataplane.redis_proxy is not None
        assert inst.dataplane.redis_proxy.upstream_failures >= 1
