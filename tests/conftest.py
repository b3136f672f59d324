"""Shared fixtures: real etcd and OpenBao, started once per test session.

No mock of etcd or Vault is used anywhere: each fixture is the real service on a free
loopback port, with its data in the session's temporary folder. Tests isolate
themselves by etcd key prefix.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from localfleet.installer import EtcdProcess, LocalServices, RedisProcess
from specmesh.etcd import EtcdClient
from specmesh.keys import Keys
from specmesh.ports import free_port
from specmesh.spec.models import PromptEntry
from specmesh.store import SpecStore
from specmesh.vault import (
    AGENT_TOKEN_ROLE,
    SUPERVISOR_POLICY,
    VaultClient,
    agent_token_role_params,
    supervisor_policy,
)

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServices]:
    svc = LocalServices(home=tmp_path_factory.mktemp("services"))
    svc.start()
    yield svc
    svc.stop()


@pytest.fixture
async def etcd(services: LocalServices) -> AsyncIterator[EtcdClient]:
    client = EtcdClient(host=services.etcd.host, port=services.etcd.client_port)
    yield client
    await client.close()


@pytest.fixture
def keys() -> Keys:
    return Keys(prefix=f"/t-{uuid.uuid4().hex[:12]}")


@pytest.fixture
async def store(etcd: EtcdClient, keys: Keys) -> SpecStore:
    return SpecStore(etcd=etcd, keys=keys)


@pytest.fixture
async def vault(services: LocalServices) -> AsyncIterator[VaultClient]:
    client = VaultClient(address=services.bao.address, token=services.bao.root_token)
    yield client
    await client.close()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A real redis-server with a password (the password belongs in Vault, not in specs)."""
    proc = RedisProcess(
        data_dir=tmp_path_factory.mktemp("redis"), port=free_port(), password="redis-pw-7f3a"
    )
    proc.start()
    yield proc
    proc.stop()


async def publish_prompt(store: SpecStore, key: str = "p") -> None:
    """Publish a prompt version (1.0.0) the test agents can name: apply refuses an agent
    whose promptKey the Prompt Center does not hold."""
    entry = PromptEntry(prompt_key=key, version="1.0.0", template="You help.")
    await store.put_prompt_version(entry, actor="fixture")


@pytest.fixture
async def own_etcd(tmp_path: Path) -> AsyncIterator[EtcdProcess]:
    """An etcd of the test's own, for tests that stop and restart it."""
    proc = EtcdProcess(data_dir=tmp_path / "etcd", client_port=free_port(), peer_port=free_port())
    await asyncio.to_thread(proc.start)
    yield proc
    await asyncio.to_thread(proc.stop)


async def supervisor_token(vault: VaultClient) -> str:
    """Set up the agent token role and the supervisor policy; a supervisor's Vault token."""
    await vault.put_token_role(AGENT_TOKEN_ROLE, agent_token_role_params())
    await vault.put_policy(SUPERVISOR_POLICY, supervisor_policy())
    token, _ = await vault.create_identity_token(
        policies=[SUPERVISOR_POLICY], period="1h", display_name="supervisor-test"
    )
    return token
