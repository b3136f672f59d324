"""The supervisor's Vault identity, against real OpenBao: it mints agents' tokens from the
``specmesh-agent`` token role and can do nothing else -- no control-plane or supervisor
policy, no root, no secret read."""

from __future__ import annotations

import pytest

from localfleet.installer import LocalServices
from specmesh.errors import SecretError
from specmesh.secrets import VaultRef
from specmesh.vault import (
    AGENT_TOKEN_ROLE,
    CONTROL_PLANE_POLICY,
    SUPERVISOR_POLICY,
    VaultClient,
    agent_policy,
    agent_policy_name,
    agent_token_role_params,
    supervisor_policy,
)


@pytest.fixture
async def supervisor(vault: VaultClient, services: LocalServices) -> VaultClient:
    await vault.put_token_role(AGENT_TOKEN_ROLE, agent_token_role_params())
    await vault.put_policy(SUPERVISOR_POLICY, supervisor_policy())
    await vault.put_policy(
        agent_policy_name("billing-helper"), agent_policy("billing-helper", mount="secret")
    )
    token, _ = await vault.create_identity_token(
        policies=[SUPERVISOR_POLICY], period="1h", display_name="supervisor-test"
    )
    return VaultClient(address=services.bao.address, token=token)


async def test_supervisor_mints_an_agent_token_holding_only_the_agents_policy(
    supervisor: VaultClient, vault: VaultClient, services: LocalServices
) -> None:
    await vault.write(
        VaultRef.parse("vault://secret/specmesh/agents/billing-helper/model#apiKey"), "k-1"
    )
    token, accessor = await supervisor.create_role_token(
        role=AGENT_TOKEN_ROLE,
        policies=[agent_policy_name("billing-helper")],
        display_name="billing-helper-stable-0",
    )
    agent = VaultClient(address=services.bao.address, token=token)
    try:
        assert await agent.token_policies() == ["default", "specmesh-agent-billing-helper"]
        assert await agent.token_ttl() is not None  # periodic: it lapses unless renewed
        ref = VaultRef.parse("vault://secret/specmesh/agents/billing-helper/model#apiKey")
        assert await agent.read(ref) == "k-1"
    finally:
        await agent.close()
        await supervisor.close()
    assert accessor


@pytest.mark.parametrize("policy", ["root", CONTROL_PLANE_POLICY, SUPERVISOR_POLICY, "default2"])
async def test_the_role_refuses_every_policy_but_an_agents(
    supervisor: VaultClient, policy: str
) -> None:
    try:
        with pytest.raises(SecretError):
            await supervisor.create_role_token(
                role=AGENT_TOKEN_ROLE, policies=[policy], display_name="x"
            )
    finally:
        await supervisor.close()


async def test_the_supervisor_reads_no_secret_and_makes_no_other_token(
    supervisor: VaultClient, vault: VaultClient
) -> None:
    ref = VaultRef.parse("vault://secret/specmesh/agents/billing-helper/model#apiKey")
    await vault.write(ref, "k-2")
    try:
        with pytest.raises(SecretError):
            await supervisor.read(ref)
        with pytest.raises(SecretError):
            await supervisor.create_identity_token(
                policies=[agent_policy_name("billing-helper")], period="1h", display_name="x"
            )
    finally:
        await supervisor.close()
