"""The Vault policies specmesh writes, and the deploy guide that tells an operator to write
the control plane's: they must not drift."""

from __future__ import annotations

import re

from specmesh.pki import agent_role_params, spiffe_id
from specmesh.vault import (
    agent_policy,
    agent_secret_prefix,
    control_plane_policy,
    is_infra_agent_secret,
)

from ..conftest import REPO


def _paths(hcl: str) -> dict[str, list[str]]:
    return {
        m.group(1): re.findall(r'"([a-z]+)"', m.group(2))
        for m in re.finditer(r'path "([^"]+)" \{\s*capabilities = \[([^\]]*)\]', hcl)
    }


def test_the_deploy_guide_writes_exactly_the_control_plane_policy() -> None:
    guide = (REPO / "docs" / "deploy.md").read_text()
    block = guide.split("vault policy write specmesh-control-plane - <<'EOF'\n", 1)[1]
    block = block.split("\nEOF", 1)[0]
    assert _paths(block) == _paths(
        control_plane_policy(pki_mount="specmesh-pki", kubernetes_auth_mount="kubernetes")
    )


def test_the_control_plane_policy_reaches_no_root_power() -> None:
    paths = _paths(control_plane_policy(pki_mount="specmesh-pki"))
    assert not [p for p in paths if p.startswith(("auth/", "sys/mounts", "sys/auth"))]
    # On Kubernetes: the agents' Kubernetes-auth roles, and nothing else of any auth method.
    k8s = _paths(control_plane_policy(pki_mount="specmesh-pki", kubernetes_auth_mount="kubernetes"))
    assert [p for p in k8s if p.startswith(("auth/", "sys/mounts", "sys/auth"))] == [
        "auth/kubernetes/role/specmesh-agent-*"
    ]
    assert [p for p in paths if p.startswith("sys/")] == [
        "sys/policies/acl/specmesh-agent-*",
        "sys/policy/specmesh-agent-*",
    ]


def test_an_agent_policy_reads_its_tree_what_is_shared_and_issues_its_own_certificate() -> None:
    paths = _paths(
        agent_policy(
            "scheduleX-assistant",
            mount="secret",
            shared=[("secret", "specmesh/shared/fleet-redis")],
            pki_mount="specmesh-pki",
        )
    )
    assert paths == {
        "secret/data/specmesh/agents/schedulex-assistant/*": ["read"],
        "secret/metadata/specmesh/agents/schedulex-assistant/*": ["read", "list"],
        "secret/data/specmesh/shared/fleet-redis": ["read"],
        "specmesh-pki/issue/specmesh-agent-schedulex-assistant": ["create", "update"],
    }


def test_an_agents_pki_role_allows_its_own_identity_only() -> None:
    params = agent_role_params("scheduleX-assistant")
    assert params["allowed_uri_sans"] == spiffe_id("schedulex-assistant")
    assert "*" not in str(params["allowed_uri_sans"]) + str(params["allowed_domains"])
    assert params["allow_any_name"] is False and params["allow_subdomains"] is False


def test_infra_agent_secrets_are_the_task_store_path_and_below_only() -> None:
    tree = agent_secret_prefix("Billing")
    assert is_infra_agent_secret(tree, f"{tree}/task-store")
    assert is_infra_agent_secret(tree, f"{tree}/task-store/extra")
    assert not is_infra_agent_secret(tree, f"{tree}/task-store-old")
    assert not is_infra_agent_secret(tree, f"{tree}/model/apiKey")
    assert not is_infra_agent_secret(tree, f"{agent_secret_prefix('other')}/task-store")
    assert not is_infra_agent_secret(tree, f"{tree}")
