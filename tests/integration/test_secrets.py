"""Secrets: plaintext in an applied spec ends up in Vault (real OpenBao), never in etcd."""

from __future__ import annotations

import pytest

from control_plane.settings import ControlPlaneSettings
from specmesh.errors import SecretAccessDeniedError, SecretError, SpecError
from specmesh.etcd import EtcdClient
from specmesh.keys import Keys
from specmesh.secrets import VaultRef
from specmesh.spec.manifest import LoadedManifest, parse_manifest
from specmesh.spec_apply import SpecService
from specmesh.store import SpecStore
from specmesh.vault import VaultClient, agent_policy, agent_policy_name

from ..conftest import publish_prompt

pytestmark = pytest.mark.integration

SEED_KEYS = {
    "sk-51668897d94****",
    "51668897d94*******",
    "51668897d9410********",
    "8897d941******c7465cff2",
}


@pytest.fixture(autouse=True)
async def _prompt(store: SpecStore) -> None:
    await publish_prompt(store, "mse-nacos-helper")


def _manifest(name: str, *, api_key: str = "sk-51668897d94****") -> LoadedManifest:
    doc = {
        "apiVersion": "specmesh.io/v1",
        "kind": "Agent",
        "metadata": {"name": name},
        "spec": {
            "base": {"description": "MSE Nacos assistant", "promptKey": "mse-nacos-helper"},
            "model": {
                "model": "qwen-plus-latest",
                "baseUrl": "https://dashscope.aliyuncs.com/compatible-mode",
                "apiKey": api_key,
                "temperature": 0.8,
                "maxTokens": 8192,
            },
            "mcpServers": [
                {
                    "mcpServerName": "gaode",
                    "queryParams": {"key": "51668897d94*******"},
                    "headers": {"key": "51668897d94*******"},
                },
                {"mcpServerName": "nacos-mcp-tools"},
            ],
            "partnerAgents": [
                {"agentName": "mse-gateway-assistant", "headers": {"key": "51668897d9410********"}},
                {"agentName": "scheduleX-assistant", "headers": {"key": "8897d941******c7465cff2"}},
            ],
        },
    }
    return LoadedManifest("test", parse_manifest(doc, source="test"))


async def test_plaintext_secrets_move_to_vault_and_etcd_holds_none(
    store: SpecStore, vault: VaultClient, etcd: EtcdClient, keys: Keys
) -> None:
    service = SpecService(store=store, vault=vault)

    outcome = await service.apply(_manifest("mse-nacos-helper"), actor="alice")

    assert outcome.revision == 1
    assert sorted(outcome.secrets_moved) == [
        "mcpServers[0].headers.key",
        "mcpServers[0].queryParams.key",
        "model.apiKey",
        "partnerAgents[0].headers.key",
        "partnerAgents[1].headers.key",
    ]
    dump = await etcd.range(keys.prefix + "/", prefix=True)
    everything = b"\n".join(kv.key.encode() + b"=" + kv.value for kv in dump.kvs).decode()
    assert dump.kvs and not [s for s in SEED_KEYS if s in everything]
    spec = (await store.get_agent("mse-nacos-helper")).spec
    ref = spec["model"]["apiKey"]
    # pinned to the KV version this apply wrote (Vault is shared by the session's tests)
    assert ref.startswith("vault://secret/specmesh/agents/mse-nacos-helper/model/apiKey#value@")
    assert VaultRef.parse(ref).version is not None
    partner_ref = spec["partnerAgents"][1]["headers"]["key"]
    assert "/partnerAgents/schedulex-assistant/headers/key#" in partner_ref
    assert await vault.read(VaultRef.parse(ref)) == "sk-51668897d94****"


async def test_agent_policy_reads_own_secrets_and_is_denied_others(
    store: SpecStore, vault: VaultClient, services: object
) -> None:
    service = SpecService(store=store, vault=vault)
    await service.apply(_manifest("mse-nacos-helper"), actor="alice")
    await service.apply(_manifest("gateway-b", api_key="sk-gateway-1"), actor="alice")
    helper_ref = VaultRef.parse((await store.get_agent("mse-nacos-helper")).spec["model"]["apiKey"])
    gateway_ref = VaultRef.parse((await store.get_agent("gateway-b")).spec["model"]["apiKey"])
    token = await vault.create_token(policies=[agent_policy_name("mse-nacos-helper")])
    as_helper = VaultClient(address=vault.address, token=token)
    try:
        assert await as_helper.read(helper_ref) == "sk-51668897d94****"
        with pytest.raises(SecretAccessDeniedError) as denied:
            await as_helper.read(gateway_ref)
        assert "sk-gateway-1" not in str(denied.value)
    finally:
        await as_helper.close()


async def test_reapply_with_references_keeps_them_and_writes_no_new_version(
    store: SpecStore, vault: VaultClient
) -> None:
    service = SpecService(store=store, vault=vault)
    await service.apply(_manifest("mse-nacos-helper"), actor="alice")

    again = await service.apply(_manifest("mse-nacos-helper"), actor="alice")

    assert again.changed is False and again.revision == 1


async def test_reference_to_another_agents_secret_is_refused(
    store: SpecStore, vault: VaultClient
) -> None:
    service = SpecService(store=store, vault=vault)
    foreign = "vault://secret/specmesh/agents/other/model/apiKey#value"

    with pytest.raises(SpecError, match=r"spec.model.apiKey: refers to another agent's secret"):
        await service.apply(_manifest("mse-nacos-helper", api_key=foreign), actor="alice")


async def test_agent_policy_reads_the_task_store_password_and_nothing_more(
    store: SpecStore, vault: VaultClient, services: object
) -> None:
    infra = VaultRef(mount="secret", path="specmesh/infra/task-store", field="password")
    other_infra = VaultRef(mount="secret", path="specmesh/infra/other", field="password")
    await vault.write(infra, "task-redis-pw")
    await vault.write(other_infra, "not-for-agents")
    plain = SpecService(store=store, vault=vault)
    await plain.apply(_manifest("gateway-b", api_key="sk-gateway-1"), actor="alice")
    await plain.apply(_manifest("mse-nacos-helper"), actor="alice")
    token = await vault.create_token(policies=[agent_policy_name("mse-nacos-helper")])
    as_helper = VaultClient(address=vault.address, token=token)
    try:
        with pytest.raises(SecretAccessDeniedError):  # not configured: not readable
            await as_helper.read(infra)

        configured = SpecService(store=store, vault=vault, infrastructure_secret=infra)
        assert await configured.write_identities() >= 2  # agents applied before it, too

        assert await as_helper.read(infra) == "task-redis-pw"
        gateway_ref = VaultRef.parse((await store.get_agent("gateway-b")).spec["model"]["apiKey"])
        with pytest.raises(SecretAccessDeniedError):
            await as_helper.read(gateway_ref)
        with pytest.raises(SecretAccessDeniedError):
            await as_helper.read(other_infra)
    finally:
        await as_helper.close()


def test_an_agents_or_the_control_planes_tree_is_refused_as_infrastructure_secret() -> None:
    with pytest.raises(SecretError, match="agent's own tree"):
        agent_policy("a", mount="secret", infrastructure=("secret", "specmesh/agents/b/x"))
    with pytest.raises(SecretError, match="control plane's"):
        agent_policy(
            "a", mount="secret", infrastructure=("secret", "specmesh/control-plane/token-issuer")
        )
    with pytest.raises(SecretError, match="control plane's"):
        agent_policy("a", mount="secret", shared=[("secret", "specmesh/control-plane/x")])
    with pytest.raises(ValueError, match="control plane's"):
        ControlPlaneSettings(
            task_store_password="vault://secret/specmesh/control-plane/token-issuer#privateKeyPem"
        )
