"""The shared A2A task store: two engine replicas over one Redis, reached as in production
through the sidecar's task-store proxy (fixed upstream, password read from OpenBao).

Real redis-server, real OpenBao, real EngineServers (ScriptedRunner behind them), the
official a2a-sdk client. Callers are named as a sidecar names them: the
``X-Specmesh-Principal`` header (HTTP) or ``x-specmesh-principal`` metadata (gRPC).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
import redis.exceptions
from a2a.client import Client, ClientCallContext, ClientConfig, create_client
from a2a.types.a2a_pb2 import (
    CancelTaskRequest,
    GetTaskRequest,
    ListTasksRequest,
    Message,
    Part,
    Role,
    SendMessageConfiguration,
    SendMessageRequest,
    StreamResponse,
    SubscribeToTaskRequest,
    TaskState,
)
from a2a.utils.constants import TransportProtocol
from a2a.utils.errors import TaskNotFoundError

from engine.server import EngineServer, ServerConfig
from engine.testing import ScriptedRunner, ScriptedTurn
from localfleet.installer import LocalServices, RedisProcess
from localfleet.modelserver import ScriptedModelServer
from sidecar.credentials import CredentialResolver
from sidecar.redisproxy import RedisProxy, fixed_redis_upstream
from sidecar.state import SnapshotHolder
from specmesh.etcd import EtcdClient
from specmesh.keys import Keys
from specmesh.ports import free_port
from specmesh.secrets import VaultRef
from specmesh.store import SpecStore
from specmesh.vault import VaultClient
from tests.polling import eventually

from .memory_support import agent_instance, apply_agent

WAIT = 15.0
ALICE = {"X-Specmesh-Principal": "specmesh/alice"}
MALLORY = {"X-Specmesh-Principal": "specmesh/mallory"}


@pytest.fixture
async def task_proxy(vault: VaultClient, redis_server: RedisProcess) -> AsyncIterator[RedisProxy]:
    """The sidecar's task-store proxy: fixed upstream, password only in OpenBao."""
    ref = VaultRef(mount="secret", path="specmesh/infra/task-store/password", field="value")
    await vault.write(ref, redis_server.password)
    async with CredentialResolver(source=vault) as credentials:
        proxy = RedisProxy(
            snapshots=SnapshotHolder(),
            credentials=credentials,
            upstream=fixed_redis_upstream(redis_server.address, password_ref=str(ref)),
            label="task store",
        )
        async with proxy:
            yield proxy


def _config(agent: str, proxy: RedisProxy, *, retention: int = 600) -> ServerConfig:
    return ServerConfig(
        agent_name=agent,
        http_port=0,
        grpc_port=0,
        drain_timeout=2.0,
        readiness_interval=0.02,
        task_store=f"redis://{proxy.address}/0",
        task_retention_seconds=retention,
    )


async def _client(server: EngineServer, binding: str, *, streaming: bool = True) -> Client:
    config = ClientConfig(
        streaming=streaming,
        supported_protocol_bindings=[binding],
        grpc_channel_factory=grpc.aio.insecure_channel,
    )
    return await create_client(server.http_url, client_config=config)


@asynccontextmanager
async def _serving(
    runner: ScriptedRunner, config: ServerConfig, binding: str, *, streaming: bool = True
) -> AsyncIterator[Client]:
    """An engine replica and an official client of it over ``binding``."""
    async with (
        EngineServer(runner=runner, config=config) as server,
        await _client(server, binding, streaming=streaming) as client,
    ):
        yield client


def _as(headers: dict[str, str]) -> ClientCallContext:
    return ClientCallContext(service_parameters=dict(headers), timeout=WAIT)


def _message(text: str) -> SendMessageRequest:
    return SendMessageRequest(
        message=Message(role=Role.ROLE_USER, message_id=uuid.uuid4().hex, parts=[Part(text=text)]),
        configuration=SendMessageConfiguration(return_immediately=True),
    )


async def _first(stream: AsyncIterator[StreamResponse]) -> StreamResponse:
    async with asyncio.timeout(WAIT):
        async for event in stream:
            return event
    raise AssertionError("the stream ended without an event")


async def _collect(stream: AsyncIterator[StreamResponse]) -> list[StreamResponse]:
    async with asyncio.timeout(WAIT):
        return [event async for event in stream]


def _agent() -> str:
    return f"tasks-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("binding", [TransportProtocol.JSONRPC, TransportProtocol.GRPC])
async def test_a_task_started_on_one_replica_is_read_and_followed_on_another(
    task_proxy: RedisProxy, binding: str
) -> None:
    agent = _agent()
    runner_a, runner_b = ScriptedRunner(), ScriptedRunner()
    turn = runner_a.enqueue(
        ScriptedTurn.answer("first second", chunks=["first ", "second"], hold_after=1)
    )
    async with (
        _serving(runner_a, _config(agent, task_proxy), binding) as client_a,
        _serving(runner_b, _config(agent, task_proxy), binding) as client_b,
    ):
        started = await _first(client_a.send_message(_message("go"), context=_as(ALICE)))
        task_id = started.task.id if started.HasField("task") else started.status_update.task_id
        await asyncio.wait_for(turn.held.wait(), WAIT)

        seen = await client_b.get_task(GetTaskRequest(id=task_id), context=_as(ALICE))
        assert seen.id == task_id
        assert seen.status.state == TaskState.TASK_STATE_WORKING

        subscription = client_b.subscribe(SubscribeToTaskRequest(id=task_id), context=_as(ALICE))
        first = await _first(subscription)  # the snapshot B serves first
        assert first.task.id == task_id
        turn.release.set()
        rest = await _collect(subscription)

        states = [e.status_update.status.state for e in rest if e.HasField("status_update")]
        assert states[-1] == TaskState.TASK_STATE_COMPLETED
        texts = [
            e.artifact_update.artifact.parts[0].text for e in rest if e.HasField("artifact_update")
        ]
        assert "second" in texts  # produced on A after B subscribed
        assert runner_b.requests == []  # B never ran the turn

        done = await client_b.get_task(GetTaskRequest(id=task_id), context=_as(ALICE))
        assert done.status.state == TaskState.TASK_STATE_COMPLETED
        listed = await client_b.list_tasks(ListTasksRequest(), context=_as(ALICE))
        assert [t.id for t in listed.tasks] == [task_id]


@pytest.mark.parametrize("binding", [TransportProtocol.JSONRPC, TransportProtocol.GRPC])
async def test_another_caller_neither_lists_nor_reaches_the_task(
    task_proxy: RedisProxy, binding: str
) -> None:
    agent = _agent()
    runner = ScriptedRunner()
    turn = runner.enqueue(ScriptedTurn.answer("held", hold_after=0))
    async with _serving(runner, _config(agent, task_proxy), binding) as client:
        started = await _first(client.send_message(_message("mine"), context=_as(ALICE)))
        task_id = started.task.id if started.HasField("task") else started.status_update.task_id
        await asyncio.wait_for(turn.held.wait(), WAIT)

        theirs = await client.list_tasks(ListTasksRequest(), context=_as(MALLORY))
        anonymous = await client.list_tasks(ListTasksRequest(), context=_as({}))
        mine = await client.list_tasks(ListTasksRequest(), context=_as(ALICE))
        with pytest.raises(TaskNotFoundError):
            await client.get_task(GetTaskRequest(id=task_id), context=_as(MALLORY))
        with pytest.raises(TaskNotFoundError):
            await client.cancel_task(CancelTaskRequest(id=task_id), context=_as(MALLORY))
        with pytest.raises(TaskNotFoundError):
            await _collect(
                client.subscribe(SubscribeToTaskRequest(id=task_id), context=_as(MALLORY))
            )
        still = await client.get_task(GetTaskRequest(id=task_id), context=_as(ALICE))
        turn.release.set()

        async def completed() -> bool:
            task = await client.get_task(GetTaskRequest(id=task_id), context=_as(ALICE))
            return task.status.state == TaskState.TASK_STATE_COMPLETED

        await eventually(completed, what="the task to complete", timeout=WAIT)

    assert list(theirs.tasks) == [] and theirs.total_size == 0
    assert list(anonymous.tasks) == []
    assert [t.id for t in mine.tasks] == [task_id]
    assert still.status.state == TaskState.TASK_STATE_WORKING  # Mallory's cancel did nothing


async def test_tasks_expire_after_the_retention(
    task_proxy: RedisProxy, redis_server: RedisProcess
) -> None:
    agent = _agent()
    runner = ScriptedRunner()
    config = _config(agent, task_proxy, retention=2)
    async with _serving(runner, config, TransportProtocol.JSONRPC, streaming=False) as client:
        request = _message("short-lived")
        request.configuration.return_immediately = False
        [sent] = await _collect(client.send_message(request, context=_as(ALICE)))
        task_id = sent.task.id
        assert sent.task.status.state == TaskState.TASK_STATE_COMPLETED
        direct = aioredis.Redis.from_url(redis_server.address, password=redis_server.password)
        try:
            keys = await direct.keys(f"specmesh:a2a:{agent}:*")
            assert keys, "the task was not written to Redis"
            ttls = [await direct.ttl(k) for k in keys]
            # each key has a TTL (-1 = none) within the retention, or is gone already (-2)
            assert all(t == -2 or 0 < t <= 2 for t in ttls), ttls

            async def gone() -> bool:
                listed = await client.list_tasks(ListTasksRequest(), context=_as(ALICE))
                try:
                    await client.get_task(GetTaskRequest(id=task_id), context=_as(ALICE))
                except TaskNotFoundError:
                    return not listed.tasks
                return False

            await eventually(gone, what="the task to expire", timeout=WAIT)

            async def no_keys() -> bool:
                return not await direct.keys(f"specmesh:a2a:{agent}:*")

            await eventually(no_keys, what="every key of the agent to expire", timeout=WAIT)
        finally:
            await direct.aclose()


async def test_an_agents_own_redis_acl_user_reaches_only_its_own_keys(
    vault: VaultClient, redis_server: RedisProcess
) -> None:
    """Doing better than one shared Redis user: each agent's task-store proxy logs in as
    the agent's own ACL user, whose key pattern is ``specmesh:a2a:<rn>:*``; the engine works
    as before, and that user cannot touch another agent's keys."""
    agent, other = _agent(), _agent()
    user, password = f"tasks-{agent}", uuid.uuid4().hex
    admin = aioredis.Redis.from_url(redis_server.address, password=redis_server.password)
    ref = VaultRef(mount="secret", path=f"specmesh/agents/{agent}/task-store", field="password")
    await vault.write(ref, password)
    try:
        await admin.execute_command(
            "ACL", "SETUSER", user, "on", f">{password}", f"~specmesh:a2a:{agent}:*",
            "resetchannels", "+@all", "-@admin", "-@dangerous",
        )  # fmt: skip
        await admin.hset(f"specmesh:a2a:{other}:task:x:y", "task", b"theirs")
        upstream = redis_server.address.replace("redis://", f"redis://{user}@")
        async with CredentialResolver(source=vault) as credentials:
            proxy = RedisProxy(
                snapshots=SnapshotHolder(),
                credentials=credentials,
                upstream=fixed_redis_upstream(upstream, password_ref=str(ref)),
                label="task store",
            )
            async with (
                proxy,
                _serving(
                    ScriptedRunner(), _config(agent, proxy), TransportProtocol.JSONRPC
                ) as client,
            ):
                request = _message("acl")
                request.configuration.return_immediately = False
                events = await _collect(client.send_message(request, context=_as(ALICE)))
                task_id = events[-1].status_update.task_id or events[-1].task.id
                task = await client.get_task(GetTaskRequest(id=task_id), context=_as(ALICE))
                listed = await client.list_tasks(ListTasksRequest(), context=_as(ALICE))

        as_agent = aioredis.Redis.from_url(redis_server.address, username=user, password=password)
        try:
            with pytest.raises(redis.exceptions.NoPermissionError):
                await as_agent.hget(f"specmesh:a2a:{other}:task:x:y", "task")
            with pytest.raises(redis.exceptions.NoPermissionError):
                await as_agent.keys("specmesh:a2a:*")
        finally:
            await as_agent.aclose()
    finally:
        await admin.execute_command("ACL", "DELUSER", user)
        await admin.aclose()

    assert task.status.state == TaskState.TASK_STATE_COMPLETED
    assert [t.id for t in listed.tasks] == [task_id]


async def test_the_sidecar_starts_the_task_store_proxy_from_its_settings(
    services: LocalServices,
    store: SpecStore,
    etcd: EtcdClient,
    keys: Keys,
    vault: VaultClient,
    redis_server: RedisProcess,
    tmp_path: Path,
) -> None:
    agent = f"tsp-{keys.prefix.rsplit('-', 1)[-1]}"
    async with ScriptedModelServer(script={"rules": []}) as model:
        await apply_agent(store, vault, agent=agent, model=model, redis=redis_server)
        ref = VaultRef(mount="secret", path="specmesh/infra/task-store", field="password")
        await vault.write(ref, redis_server.password)
        listen = f"127.0.0.1:{free_port()}"
        extra = {
            "task_store_proxy": listen,
            "task_store_upstream": f"redis://{redis_server.host}:{redis_server.port}/3",
            "task_store_password": str(ref),
        }
        common = {"services": services, "etcd": etcd, "keys": keys, "home": tmp_path / "i1"}
        async with agent_instance(agent=agent, instance_id="i1", extra=extra, **common) as inst:
            proxy = inst.dataplane.task_store_proxy
            assert proxy is not None and proxy.listening
            engine_side = aioredis.Redis.from_url(f"redis://{listen}/0", driver_info=None)
            try:
                assert await engine_side.ping()  # no password on the engine's side
                await engine_side.set(f"specmesh:a2a:{agent}:probe", b"via-proxy")
            finally:
                await engine_side.aclose()
    direct = aioredis.Redis.from_url(
        f"redis://{redis_server.host}:{redis_server.port}/3", password=redis_server.password
    )
    try:
        assert await direct.get(f"specmesh:a2a:{agent}:probe") == b"via-proxy"  # db 3
    finally:
        await direct.aclose()


@pytest.mark.parametrize(
    "binding",
    [TransportProtocol.JSONRPC, TransportProtocol.HTTP_JSON, TransportProtocol.GRPC],
)
async def test_an_unreachable_task_store_tells_the_client_no_address(
    vault: VaultClient, binding: str
) -> None:
    """The proxy's upstream is a closed port: the engine logs the address, the client only
    hears that the task store is unavailable (gRPC: UNAVAILABLE, so it may retry)."""
    closed = free_port()
    ref = VaultRef(mount="secret", path=f"specmesh/test/closed-{closed}", field="password")
    await vault.write(ref, "unused")
    async with CredentialResolver(source=vault) as credentials:
        proxy = RedisProxy(
            snapshots=SnapshotHolder(),
            credentials=credentials,
            upstream=fixed_redis_upstream(f"redis://127.0.0.1:{closed}/0", password_ref=str(ref)),
            label="task store",
        )
        async with proxy, _serving(ScriptedRunner(), _config(_agent(), proxy), binding) as client:
            with pytest.raises(Exception) as listed:
                await client.list_tasks(ListTasksRequest(), context=_as(ALICE))
            with pytest.raises(Exception) as sent:
                request = _message("lost")
                request.configuration.return_immediately = False
                await _collect(client.send_message(request, context=_as(ALICE)))

    for raised in (listed.value, sent.value):
        shown = str(raised)
        assert "task store is unavailable" in shown, shown
        assert "127.0.0.1" not in shown and str(closed) not in shown, shown
        assert proxy.address not in shown, shown
    if binding == TransportProtocol.GRPC:
        cause = listed.value.__cause__
        assert isinstance(cause, grpc.aio.AioRpcError)
        assert cause.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_task_store_the_engine_cannot_reach_tells_the_client_no_address() -> None:
    closed = free_port()
    config = ServerConfig(
        agent_name=_agent(),
        http_port=0,
        grpc_port=0,
        drain_timeout=2.0,
        readiness_interval=0.02,
        task_store=f"redis://127.0.0.1:{closed}/0",
    )
    async with _serving(ScriptedRunner(), config, TransportProtocol.JSONRPC) as client:
        with pytest.raises(Exception) as raised:
            await client.get_task(GetTaskRequest(id="t"), context=_as(ALICE))
    shown = str(raised.value)
    assert "task store is unavailable" in shown, shown
    assert str(closed) not in shown and "127.0.0.1" not in shown, shown
