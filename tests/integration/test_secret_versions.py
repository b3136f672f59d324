"""Versioned secret references (real etcd and OpenBao): a revision pins the exact KV
versions it runs with, so what the agent's sidecar injects is always what the current revision
names -- through refused applies, rollbacks and a control plane killed mid-apply."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from control_plane.auth import Role
from localfleet.installer import LocalServices
from sidecar.credentials import CredentialResolver
from specmesh.errors import ConflictError
from specmesh.etcd import EtcdClient
from specmesh.keys import Keys
from specmesh.secrets import VaultRef
from specmesh.spec.manifest import LoadedManifest, parse_manifest
from specmesh.spec_apply import SpecService
from specmesh.store import SpecStore
from specmesh.vault import (
    CONTROL_PLANE_POLICY,
    VaultClient,
    agent_policy_name,
    agent_secret_prefix,
    control_plane_policy,
)

from ..conftest import publish_prompt
from .cp_process import ControlPlaneProcess

pytestmark = pytest.mark.integration
TOKEN = f"tok-{uuid.uuid4().hex}"


def _agent(name: str, api_key: str, description: str = "d") -> dict[str, Any]:
    return {
        "apiVersion": "specmesh.io/v1",
        "kind": "Agent",
        "metadata": {"name": name},
        "spec": {
            "base": {"description": description, "promptKey": "p"},
            "model": {"model": "m", "apiKey": api_key},
        },
    }


def _loaded(doc: dict[str, Any]) -> LoadedManifest:
    return LoadedManifest("test", parse_manifest(doc, source="test"))


async def _injected(vault: VaultClient, store: SpecStore, agent: str) -> str:
    """What the agent's sidecar injects now: the current revision's reference, resolved by
    the sidecar's resolver with a token holding only the agent's policy."""
    ref = (await store.get_agent(agent)).spec["model"]["apiKey"]
    token = await vault.create_token(policies=[agent_policy_name(agent)])
    as_agent = VaultClient(address=vault.address, token=token)
    try:
        async with CredentialResolver(source=as_agent, ttl=60) as resolver:
            return await resolver.resolve(ref)
    finally:
        await as_agent.close()


@pytest.fixture
async def service(store: SpecStore, vault: VaultClient) -> SpecService:
    await publish_prompt(store)
    return SpecService(store=store, vault=vault)


async def test_a_key_only_change_is_a_new_revision_with_an_audit_entry_and_a_version_diff(
    service: SpecService, store: SpecStore
) -> None:
    name = f"kv-{uuid.uuid4().hex[:6]}"
    first = await service.apply(_loaded(_agent(name, "sk-first")), actor="alice")
    second = await service.apply(_loaded(_agent(name, "sk-second")), actor="alice")

    assert (first.revision, second.revision, second.changed) == (1, 2, True)
    a = VaultRef.parse((await store.get_agent(name, 1)).spec["model"]["apiKey"])
    b = VaultRef.parse((await store.get_agent(name, 2)).spec["model"]["apiKey"])
    assert a.location == b.location and a.version is not None and b.version == a.version + 1
    changes = [str(c) for c in await store.diff(name, 1, 2)]
    assert changes == [f"~ model.apiKey: version {a.version} -> {b.version}"]
    audit = await store.audit_entries(name=name, kind="Agent", limit=10)
    assert [e.revision for e in audit] == [2, 1]
    assert "sk-second" not in str([e.to_json() for e in audit])


async def test_reapplying_the_same_key_is_unchanged_and_writes_no_version(
    service: SpecService, store: SpecStore, vault: VaultClient
) -> None:
    name = f"kv-{uuid.uuid4().hex[:6]}"
    await service.apply(_loaded(_agent(name, "sk-same")), actor="alice")
    ref = VaultRef.parse((await store.get_agent(name)).spec["model"]["apiKey"])

    again = await service.apply(_loaded(_agent(name, "sk-same")), actor="alice")

    assert (again.changed, again.revision) == (False, 1)
    versions = await vault.versions(mount=ref.mount, path=ref.path)
    assert sorted(versions) == [ref.version]


async def test_a_refused_apply_leaves_the_live_key_and_gc_destroys_its_orphan(
    service: SpecService, store: SpecStore, vault: VaultClient
) -> None:
    name = f"kv-{uuid.uuid4().hex[:6]}"
    await service.apply(_loaded(_agent(name, "sk-live")), actor="alice")

    with pytest.raises(ConflictError):
        await service.apply(_loaded(_agent(name, "sk-refused")), actor="bob", expected_revision=0)

    assert await _injected(vault, store, name) == "sk-live"
    live = VaultRef.parse((await store.get_agent(name)).spec["model"]["apiKey"])
    versions = await vault.versions(mount=live.mount, path=live.path)
    assert len(versions) == 2  # the refused apply's key: written, never referenced
    kept = await service.collect_garbage(grace_seconds=3600, only=[name])
    assert kept.destroyed == []  # too young to judge: an apply may be mid-flight
    report = await service.collect_garbage(grace_seconds=0, only=[name])
    orphan = max(versions)
    assert report.destroyed == [f"vault://{live.mount}/{live.path}@{orphan}"]
    assert (await vault.versions(mount=live.mount, path=live.path))[orphan]["destroyed"]
    assert await _injected(vault, store, name) == "sk-live"  # the referenced one stays


async def test_rollback_to_a_revision_injects_that_revisions_key(
    service: SpecService, store: SpecStore, vault: VaultClient
) -> None:
    name = f"kv-{uuid.uuid4().hex[:6]}"
    await service.apply(_loaded(_agent(name, "sk-one")), actor="alice")
    await service.apply(_loaded(_agent(name, "sk-two")), actor="alice")
    assert await _injected(vault, store, name) == "sk-two"

    await store.rollback(name, 1, actor="alice")

    assert await _injected(vault, store, name) == "sk-one"
    report = await service.collect_garbage(grace_seconds=0, only=[name])
    assert report.destroyed == []  # every version is pinned by some revision


async def test_gc_destroys_the_keys_of_a_deleted_agent(
    service: SpecService, store: SpecStore, vault: VaultClient
) -> None:
    name = f"kv-{uuid.uuid4().hex[:6]}"
    await service.apply(_loaded(_agent(name, "sk-gone")), actor="alice")
    ref = VaultRef.parse((await store.get_agent(name)).spec["model"]["apiKey"])
    await store.delete_agent(name, actor="alice")

    report = await service.collect_garbage(grace_seconds=0, only=[name])

    assert report.destroyed == [f"vault://{ref.mount}/{ref.path}@{ref.version}"]


async def test_gc_spares_the_task_store_password_infrastructure_keeps_in_an_agents_tree(
    service: SpecService, store: SpecStore, vault: VaultClient
) -> None:
    """Per-agent task-store mode (docs/deploy.md 3.8): the operator writes the agent's Redis
    password into its tree; no revision references it, yet the collection keeps it, while
    an orphan of a refused apply beside it is still destroyed."""
    name = f"kv-{uuid.uuid4().hex[:6]}"
    await service.apply(_loaded(_agent(name, "sk-live")), actor="alice")
    with pytest.raises(ConflictError):
        await service.apply(_loaded(_agent(name, "sk-refused")), actor="bob", expected_revision=0)
    password = VaultRef(
        mount=service.kv_mount, path=f"{agent_secret_prefix(name)}/task-store", field="password"
    )
    await vault.write(password, "redis-pass-1")
    await vault.write(password, "redis-pass-2")  # rotated: both versions stay
    live = VaultRef.parse((await store.get_agent(name)).spec["model"]["apiKey"])
    orphan = max(await vault.versions(mount=live.mount, path=live.path))

    report = await service.collect_garbage(grace_seconds=0, only=[name])

    assert report.destroyed == [f"vault://{live.mount}/{live.path}@{orphan}"]
    kept = await vault.versions(mount=password.mount, path=password.path)
    assert not any(meta.get("destroyed") for meta in kept.values())
    assert await vault.read(password) == "redis-pass-2"
    assert await _injected(vault, store, name) == "sk-live"


# ---------------------------------------------------------------- kill -9 mid-apply


@pytest.fixture
def cp_process(services: LocalServices, tmp_path: Path) -> Iterator[ControlPlaneProcess]:
    """A control-plane process with its own Vault policy (not root), restartable."""

    async def cp_token() -> str:
        root = VaultClient(address=services.bao.address, token=services.bao.root_token)
        try:
            await root.put_policy(CONTROL_PLANE_POLICY, control_plane_policy())
            made, _ = await root.create_identity_token(
                policies=[CONTROL_PLANE_POLICY], period="1h", display_name="ci-cp"
            )
            return made
        finally:
            await root.close()

    process = ControlPlaneProcess(
        services,
        tmp_path,
        tokens={TOKEN: ("ci-operator", [Role.OPERATOR])},
        vault_token=asyncio.run(cp_token()),
    )
    yield process
    process.stop()


def _apply_all(url: str, token: str, docs: list[dict[str, Any]]) -> list[int]:
    """The docs applied in parallel (8 threads); each status code (0: connection lost)."""
    import concurrent.futures

    def one(doc: dict[str, Any]) -> int:
        try:
            r = requests.post(
                f"{url}/api/v1/apply",
                json={"manifest": doc},
                headers={"Authorization": f"Bearer {token}"},
                timeout=30,
            )
            return r.status_code
        except requests.RequestException:
            return 0

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(one, docs))


@pytest.mark.parametrize("run", [1, 2])
def test_a_control_plane_killed_mid_apply_never_splits_vault_from_etcd(
    services: LocalServices, cp_process: tuple[Any, ...], run: int
) -> None:
    prefix, token, start, kill = cp_process.prefix, TOKEN, cp_process.start, cp_process.kill
    agents = [f"crash{run}-{i}" for i in range(8)]

    async def prompt() -> None:
        etcd = EtcdClient(host=services.etcd.host, port=services.etcd.client_port)
        try:
            await publish_prompt(SpecStore(etcd=etcd, keys=Keys(prefix=prefix)))
        finally:
            await etcd.close()

    asyncio.run(prompt())
    url = start()
    statuses = _apply_all(url, token, [_agent(a, f"sk-{a}-0", "attempt 0") for a in agents])
    assert statuses == [200] * 8
    lost = 0
    for attempt in range(1, 4):
        docs = [_agent(a, f"sk-{a}-{attempt}", f"attempt {attempt}") for a in agents]
        import threading

        killer = threading.Timer(0.02 * attempt, kill)  # kill -9 in the middle of the round
        killer.start()
        lost += _apply_all(url, token, docs).count(0)
        killer.join()
        url = start()
    assert lost > 0  # the kills did land in the middle of applies

    async def check() -> None:
        etcd = EtcdClient(host=services.etcd.host, port=services.etcd.client_port)
        root = VaultClient(address=services.bao.address, token=services.bao.root_token)
        try:
            store = SpecStore(etcd=etcd, keys=Keys(prefix=prefix))
            for a in agents:
                record = await store.get_agent(a)
                attempt = record.spec["base"]["description"].removeprefix("attempt ")
                assert await _injected(root, store, a) == f"sk-{a}-{attempt}", a
        finally:
            await root.close()
            await etcd.close()

    asyncio.run(check())


async def test_gc_never_touches_a_tree_its_store_does_not_own(
    service: SpecService, vault: VaultClient
) -> None:
    """Another installation's agent (one Vault, another etcd prefix), or an empty etcd:
    no agent of this store, no deletion recorded by it -- nothing of it is destroyed."""
    stranger = f"stranger-{uuid.uuid4().hex[:6]}"
    ref = VaultRef(mount="secret", path=f"specmesh/agents/{stranger}/model/apiKey", field="value")
    written = await vault.write_version(ref, "sk-someone-elses")

    report = await service.collect_garbage(grace_seconds=0, only=[stranger])

    assert report.destroyed == []
    assert await vault.read(written) == "sk-someone-elses"
