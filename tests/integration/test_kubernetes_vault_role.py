"""The agent's Vault Kubernetes-auth role, against real OpenBao: the Kubernetes runtime
writes ``auth/<mount>/role/<prefix><rn>`` on apply (the agent's ServiceAccount in the
namespace -> the agent's policy) and deletes it on remove, with the control plane's own
policy (control_plane_policy), which allows agents' roles and nothing else under auth/.

The Kubernetes side is the fake API server of tests/unit/kube_api.py (the real lightkube
client); no cluster, so no sidecar really logs in with the role (that needs a Kubernetes
token reviewer).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import hvac
import pytest
from aiohttp import web
from lightkube import AsyncClient, KubeConfig
from lightkube.config.models import Cluster, User

from control_plane.runtime.kubernetes import ChartRenderer, KubernetesRuntime, VaultRoles
from localfleet.installer import LocalServices
from specmesh.errors import SecretAccessDeniedError, SecretNotFoundError
from specmesh.spec.models import DeploymentSpec
from specmesh.vault import VaultClient, control_plane_policy
from specmesh.workloads import AgentWorkload

from ..unit.kube_api import FakeKubeApi
from ..unit.test_helm_chart import BASE, CHART, NAMESPACE, RELEASE

pytestmark = pytest.mark.integration


@pytest.fixture
async def mount(vault: VaultClient, services: LocalServices) -> AsyncIterator[str]:
    """A Kubernetes auth method of its own (the OpenBao is the session's)."""
    path = f"k8s-{uuid.uuid4().hex[:8]}"
    root = hvac.Client(url=services.bao.address, token=services.bao.root_token)
    await asyncio.to_thread(root.sys.enable_auth_method, "kubernetes", path=path)
    yield path
    await asyncio.to_thread(root.sys.disable_auth_method, path)
    root.adapter.close()


@pytest.fixture
async def control_plane(
    vault: VaultClient, services: LocalServices, mount: str
) -> AsyncIterator[VaultClient]:
    """A token holding only the control plane's policy (as docs/deploy.md writes it)."""
    policy = f"specmesh-control-plane-{mount}"
    await vault.put_policy(
        policy, control_plane_policy(pki_mount="specmesh-pki", kubernetes_auth_mount=mount)
    )
    token = await vault.create_token(policies=[policy])
    client = VaultClient(address=services.bao.address, token=token)
    yield client
    await client.close()


@pytest.fixture(scope="module")
def renderer() -> Iterator[ChartRenderer]:
    # Helm merges these over the chart's own defaults, as with the chart's ConfigMap.
    r = ChartRenderer(chart_path=CHART, values=BASE, release=RELEASE, namespace=NAMESPACE)
    yield r
    r.close()


@pytest.fixture
async def api_url() -> AsyncIterator[str]:
    runner = web.AppRunner(FakeKubeApi().app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def test_apply_writes_the_agents_role_and_remove_deletes_it(
    control_plane: VaultClient, mount: str, renderer: ChartRenderer, api_url: str
) -> None:
    client = AsyncClient(
        KubeConfig.from_one(cluster=Cluster(server=api_url), user=User(token="t"),
                            namespace=NAMESPACE),
        trust_env=False,
    )  # fmt: skip
    roles = VaultRoles(mount=mount, audience="vault")
    runtime = KubernetesRuntime(
        client=client,
        renderer=renderer,
        namespace=NAMESPACE,
        vault=control_plane,
        vault_roles=roles,
    )
    workload = AgentWorkload(
        agent="scheduleX-assistant",
        revision=1,
        replicas={"stable": 1, "canary": 0},
        deployment=DeploymentSpec(),
    )
    try:
        await runtime.apply(workload)
        role = await control_plane.read_kubernetes_role(
            mount=mount, name="specmesh-agent-schedulex-assistant"
        )
        assert role["bound_service_account_names"] == ["specmesh-agent-schedulex-assistant"]
        assert role["bound_service_account_namespaces"] == [NAMESPACE]
        assert role["token_policies"] == ["specmesh-agent-schedulex-assistant"]
        assert role["token_ttl"] == 3600
        assert role["audience"] == "vault"

        await runtime.apply(workload)  # idempotent: the same role again

        await runtime.remove("schedulex-assistant")
        with pytest.raises(SecretNotFoundError):
            await control_plane.read_kubernetes_role(
                mount=mount, name="specmesh-agent-schedulex-assistant"
            )
        await runtime.remove("schedulex-assistant")  # gone already: fine
    finally:
        await runtime.close()


async def test_the_control_plane_may_write_agents_roles_only(
    control_plane: VaultClient, mount: str
) -> None:
    with pytest.raises(SecretAccessDeniedError):
        await control_plane.put_kubernetes_role(
            mount=mount,
            name="specmesh-control-plane",
            service_account="specmesh-agent-x",
            namespace=NAMESPACE,
            policies=["specmesh-agent-x"],
        )
    with pytest.raises(SecretAccessDeniedError):
        await control_plane.put_kubernetes_role(
            mount="kubernetes-other",
            name="specmesh-agent-x",
            service_account="specmesh-agent-x",
            namespace=NAMESPACE,
            policies=["specmesh-agent-x"],
        )
