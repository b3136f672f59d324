"""Redis memory across instances, through the sidecar's Redis proxy: real redis-server with a
password kept in OpenBao, real sidecars (DataPlane) in-process, real engines, litellm to the
scripted model server. The engine never holds the Redis password."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, ResponseError
from starlette.applications import Starlette

from engine.errors import MemoryStoreError
from engine.memory import RedisConversationMemory, memory_key
from engine.rest import create_business_routes
from localfleet.installer import RedisProcess
from localfleet.modelserver import ScriptedModelServer

from .memory_support import (
    REDIS_PASSWORD,
    Instance,
    MemoryRig,
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
    memory_rig: MemoryRig, direct: aioredis.Redis
) -> None:
    model, redis_server = memory_rig.model, memory_rig.redis
    agent = memory_rig.agent_name("mem")
    await memory_rig.apply(agent)

    async with (
        memory_rig.instance(agent, "i1") as first,
        memory_rig.instance(agent, "i2") as second,
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
    memory_rig: MemoryRig,
) -> None:
    agent = memory_rig.agent_name("memx")
    await memory_rig.apply(agent)
    await memory_rig.vault.write(password_ref(agent), "not-the-password")
    async with memory_rig.instance(agent) as inst:
        memory = inst.runtime.context.memory if inst.runtime.context else None
        assert isinstance(memory, RedisConversationMemory)
        with pytest.raises(MemoryStoreError) as caught:
            async with asyncio.timeout(10):
                await memory.get("c")
        assert "auth_refused" in caught.value.reason
        assert "not-the-password" not in str(caught.value)
        assert inst.dataplane.redis_proxy is not None
        assert inst.dataplane.redis_proxy.upstream_failures >= 1
