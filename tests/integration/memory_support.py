"""What the memory tests share: an agent instance = a real sidecar (DataPlane: egress with
Vault credentials, Redis proxy) in-process + a real EngineRuntime fed the sidecar's own
snapshot, litellm to a ScriptedModelServer, Redis password only in OpenBao."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.hot_reload import EngineRuntime
from engine.intake import GrpcSnapshotFeed, InMemorySnapshotFeed, SnapshotFeed
from engine.settings import EngineSettings
from engine.turn_protocol import TurnCompleted, TurnEvent, TurnRequest
from localfleet.installer import LocalServices, RedisProcess
from localfleet.modelserver import ScriptedModelServer
from sidecar.dataplane import DataPlane
from sidecar.main import Sidecar
from sidecar.settings import SidecarSettings
from specmesh.etcd import EtcdClient
from specmesh.keys import Keys
from specmesh.ports import free_port
from specmesh.secrets import VaultRef
from specmesh.spec.models import AgentSpec, PromptEntry
from specmesh.store import SpecStore
from specmesh.vault import VaultClient

WAIT = 20.0
REDIS_PASSWORD = "redis-pw-7f3a"


def password_ref(agent: str) -> VaultRef:
    return VaultRef(mount="secret", path=f"specmesh/agents/{agent}/memory/password", field="value")


def scripted_model(model: ScriptedModelServer, **more: Any) -> dict[str, Any]:
    """An agent's ``model`` part calling the scripted model server directly (no retries)."""
    return {
        "model": "scripted",
        "baseUrl": model.url,
        "temperature": 0,
        "maxRetries": 0,
        "timeoutSeconds": 10,
        **more,
    }


async def apply_agent(
    store: SpecStore,
    vault: VaultClient,
    *,
    agent: str,
    model: ScriptedModelServer,
    redis: RedisProcess,
    memory: Mapping[str, Any] | None = None,
    model_part: Mapping[str, Any] | None = None,
) -> AgentSpec:
    """Apply an agent whose memory is the test Redis, its password referenced from Vault."""
    ref = password_ref(agent)
    await vault.write(ref, REDIS_PASSWORD)
    await store.put_prompt_version(
        PromptEntry(prompt_key=agent, version="1", template="You are a helpful assistant."),
        actor="t",
    )
    spec = AgentSpec.model_validate(
        {
            "base": {"description": "remembers", "promptKey": agent},
            "model": scripted_model(model, **(model_part or {})),
            "memory": {
                "storageType": "redis",
                "address": redis.address,
                "credentials": {"password": str(ref)},
                "ttlSeconds": 600,
                **(memory or {}),
            },
        }
    )
    await store.apply_agent(agent, spec, actor="t")
    return spec


@dataclass
class Instance:
    """One instance of the agent: its sidecar and its engine."""

    sidecar: Sidecar
    runtime: EngineRuntime
    proxy_address: str
    egress_url: str

    @property
    def dataplane(self) -> DataPlane:
        (component,) = [c for c in self.sidecar.components if isinstance(c, DataPlane)]
        return component


@asynccontextmanager
async def agent_instance(
    *,
    agent: str,
    instance_id: str,
    services: LocalServices,
    etcd: EtcdClient,
    keys: Keys,
    home: Path,
    extra: Mapping[str, Any] | None = None,
    engine: Mapping[str, Any] | None = None,
    follow: bool = False,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncIterator[Instance]:
    """``extra``: more sidecar settings (by field name); ``engine``: more engine settings;
    ``follow``: the engine takes the sidecar's snapshot stream (hot reloads, as in
    production) rather than the one snapshot the sidecar had at start; ``clock``: the
    engine's pin clock."""
    egress_port, proxy_port = free_port(), free_port()
    await asyncio.to_thread(home.mkdir, parents=True, exist_ok=True)
    settings = SidecarSettings(
        agent_name=agent,
        instance_id=instance_id,
        sync_addr=f"unix:{home}/sync.sock",
        egress_url=f"http://127.0.0.1:{egress_port}",
        redis_proxy=f"127.0.0.1:{proxy_port}",
        inbound=f"127.0.0.1:{free_port()}",
        ops=f"127.0.0.1:{free_port()}",
        engine_http=f"127.0.0.1:{free_port()}",
        home=home,
        etcd_endpoint=etcd.endpoint,
        etcd_prefix=keys.prefix,
        vault_addr=services.bao.address,
        vault_token=services.bao.root_token,
        mtls=False,
        **dict(extra or {}),
    )
    sidecar = Sidecar(settings=settings, component_factories=[DataPlane])
    await sidecar.start()
    try:
        await asyncio.wait_for(sidecar.sync.wait_resolved(), WAIT)
        snapshot = sidecar.holder.current
        assert snapshot is not None
        config = EngineSettings(
            agent_name=agent,
            egress_url=settings.egress_url,
            redis_proxy=settings.redis_proxy,
            **dict(engine or {}),
        )
        feed: SnapshotFeed = (
            GrpcSnapshotFeed(settings.sync_addr, agent_name=agent)
            if follow
            else InMemorySnapshotFeed()
        )
        async with EngineRuntime(feed=feed, settings=config, clock=clock) as runtime:
            if isinstance(feed, InMemorySnapshotFeed):
                await feed.publish(snapshot)  # the secret-free snapshot the sidecar streams
            await runtime.wait_ready(timeout=WAIT)
            yield Instance(
                sidecar=sidecar,
                runtime=runtime,
                proxy_address=settings.redis_proxy,
                egress_url=settings.egress_url,
            )
    finally:
        await sidecar.stop()


async def ask(
    runtime: EngineRuntime, text: str, *, context_id: str, headers: dict[str, str] | None = None
) -> TurnCompleted:
    """One turn; ``headers``: those its request came with (as the sidecar sends them)."""
    request = TurnRequest(context_id=context_id, text=text, headers=headers or {})
    async with asyncio.timeout(WAIT):
        events: list[TurnEvent] = [e async for e in runtime.run(request)]
    final = events[-1]
    assert isinstance(final, TurnCompleted), final
    return final


@dataclass
class MemoryRig:
    """What a memory test stands on: the shared services, this test's etcd prefix, the
    module's scripted model, the password-protected Redis, and a folder of its own."""

    services: LocalServices
    store: SpecStore
    etcd: EtcdClient
    keys: Keys
    vault: VaultClient
    model: ScriptedModelServer
    redis: RedisProcess
    home: Path

    def agent_name(self, tag: str) -> str:
        """An agent name unique to this test: ``tag`` and the test's prefix suffix."""
        return f"{tag}-{self.keys.prefix.rsplit('-', 1)[-1]}"

    async def apply(self, agent: str, **parts: Mapping[str, Any] | None) -> AgentSpec:
        """``apply_agent`` on this rig; ``parts``: its ``memory`` / ``model_part``."""
        return await apply_agent(
            self.store,
            self.vault,
            agent=agent,
            model=self.model,
            redis=self.redis,
            memory=parts.get("memory"),
            model_part=parts.get("model_part"),
        )

    def instance(
        self, agent: str, instance_id: str = "i1"
    ) -> AbstractAsyncContextManager[Instance]:
        """``agent_instance`` on this rig, its home ``<folder>/<instance_id>``."""
        return agent_instance(
            agent=agent,
            instance_id=instance_id,
            services=self.services,
            etcd=self.etcd,
            keys=self.keys,
            home=self.home / instance_id,
        )
