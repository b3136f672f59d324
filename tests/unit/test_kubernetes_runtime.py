"""The Kubernetes runtime (control_plane/runtime/kubernetes.py), without a cluster.

What is exercised here:

- Rendering: for six workloads (plain, canary, autoscaling with a canary, custom resources,
  stable track stopped, a canary asked for by a release) the runtime's renderer runs the
  chart's real templates through Helm's SDK, with the install values taken from the
  ConfigMap the chart gives the control plane; every object validates with
  kubernetes-validate (strict, the newest Kubernetes it ships) and none is an Istio object.
- One template source: the whole chart rendered the way a user would (helm_python, with
  `agents: [the same entries]`) yields the same agent objects, compared object by object.
- Apply, prune, remove, running and observe through the real lightkube AsyncClient against
  a fake API server that speaks the Kubernetes REST protocol (tests/unit/kube_api.py:
  server-side apply PATCH, list with labelSelector, get, delete, Status errors); every
  request is recorded and asserted on.
- The chart's RBAC grants the control plane what the runtime calls, and the control
  plane's pod gets the settings the runtime reads.

What is NOT exercised (no cluster runs here): a real API server's server-side apply
merge (several field managers, field ownership, the replicas hand-over to an HPA),
admission (Pod Security, quotas, webhooks, the API server's own validation such as a
request above its limit, which the renderer checks itself), garbage collection of
ReplicaSets and pods after a Deployment is deleted, pods really starting (the pod states
observed are written into the fake by the test), RBAC enforcement, and TLS/token auth to
the API server (the fake is plain HTTP). The Vault role is tested against real OpenBao
in tests/integration/test_kubernetes_vault_role.py.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml
from lightkube import AsyncClient, KubeConfig
from lightkube.config.models import Cluster, User
from lightkube.core.resource import api_info

from control_plane.istio import CRDS_PATH
from control_plane.mesh import IstioValidator
from control_plane.runtime import Runtime
from control_plane.runtime.kubernetes import (
    FIELD_MANAGER,
    KINDS,
    ChartRenderer,
    ChartRenderError,
    KubernetesRefusedError,
    KubernetesRuntime,
    KubernetesRuntimeError,
    KubernetesUnavailableError,
    ObjectNotOwnedError,
    agent_entry,
    kubernetes_runtime_from_env,
    pod_instance,
)
from control_plane.settings import KubernetesRuntimeSettings
from specmesh.issuers import parse_jwt_issuers
from specmesh.k8s import (
    A2A_GRPC_PORT,
    A2A_HTTP_PORT,
    LABEL_AGENT,
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    LABEL_TRACK,
    MANAGED_BY,
)
from specmesh.spec.models import DeploymentSpec, ReleaseSpec
from specmesh.workloads import AgentWorkload, desired_replicas

from .kube_api import APPLY_PATCH, FakeKubeApi, role_grants, serving
from .kube_api import KINDS as FAKE_KINDS
from .test_helm_chart import BASE, CHART, NAMESPACE, RELEASE, _problems

Obj = dict[str, Any]

INSTALLS: dict[str, Obj] = {
    "defaults": copy.deepcopy(BASE),
    "customised": {
        **copy.deepcopy(BASE),
        "image": {"repository": "registry.example.com/specmesh", "digest": "sha256:" + "b" * 64},
        "imagePullSecrets": [{"name": "regcred"}],
        "istio": {"enabled": False},
        "otel": {"endpoint": "http://otel.observability.svc:4317"},
        "vault": {"addr": "https://vault.example.com:8200", "tokenAudience": "vault"},
        "agentDefaults": {"podDisruptionBudget": {"maxUnavailable": "50%"}},
        "networkPolicy": {"egress": {"externalHttps": False}},
        "taskStore": {
            "upstream": "redis://specmesh-tasks@redis.redis.svc:6379/1",
            "passwordRef": "vault://secret/specmesh/infra/task-store#password",
            "retentionSeconds": 600,
        },
    },
    "task-store-per-agent": {
        **copy.deepcopy(BASE),
        "taskStore": {"upstream": "redis://redis.redis.svc:6379/0", "perAgentUser": True},
    },
    "gateway-api": {
        **copy.deepcopy(BASE),
        "istio": {"enabled": True, "routes": "gateway-api"},
        "jwt": {
            "controlPlaneIssuer": "specmesh",
            "issuers": [{"issuer": "https://idp.example.com", "jwks": {"keys": []}}],
        },
    },
}


def _workload(agent: str, deployment: Obj, release: Obj | None = None) -> AgentWorkload:
    spec = DeploymentSpec.model_validate(deployment)
    rel = ReleaseSpec.model_validate(release) if release else None
    return AgentWorkload(
        agent=agent, revision=3, replicas=desired_replicas(spec, rel), deployment=spec
    )


WORKLOADS: dict[str, AgentWorkload] = {
    "plain": _workload("mse-nacos-helper", {}),
    "canary": _workload(
        "scheduleX-assistant",
        {"tracks": {"stable": {"replicas": 3}, "canary": {"enabled": True, "replicas": 2}}},
    ),
    "autoscaling": _workload(
        "mse-gateway-assistant",
        {
            "tracks": {"canary": {"enabled": True}},
            "autoscaling": {"enabled": True, "min": 2, "max": 6, "targetCPU": 60},
        },
    ),
    "resources": _workload(
        "billing_bot.v2",
        {
            "resources": {
                "engine": {
                    "requests": {"cpu": "500m", "memory": "512Mi"},
                    "limits": {"cpu": "2", "memory": "2Gi"},
                },
                "sidecar": {"limits": {"cpu": "250m"}},
            }
        },
    ),
    "stopped": _workload("idle-agent", {"tracks": {"stable": {"replicas": 0}}}),
    "release-canary": _workload(
        "a.b_c-d9", {}, {"stableRevision": 2, "canaryRevision": 3, "canaryWeight": 10}
    ),
}


@pytest.fixture(scope="module")
def chart() -> Iterator[helm_python.Chart]:
    with helm_python.Chart.load(CHART) as c:
        yield c


def _docs(manifests: dict[str, str]) -> list[Obj]:
    return [
        d
        for template, text in sorted(manifests.items())
        if template.endswith(".yaml")
        for d in yaml.safe_load_all(text)
        if d
    ]


def _install_values(chart: helm_python.Chart, install: Obj) -> Obj:
    """What the control plane reads: the chart's ConfigMap of its install values."""
    docs = _docs(chart.render({**install, "agents": []}, name=RELEASE, namespace=NAMESPACE))
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert cm["metadata"]["name"] == f"{RELEASE}-control-plane-chart-values"
    values: Obj = yaml.safe_load(cm["data"]["values.yaml"])
    return values


@pytest.fixture(scope="module", params=list(INSTALLS))
def install(request: pytest.FixtureRequest) -> Obj:
    return INSTALLS[request.param]


@pytest.fixture(scope="module")
def renderer(install: Obj, chart: helm_python.Chart) -> Iterator[ChartRenderer]:
    r = ChartRenderer(
        chart_path=CHART,
        values=_install_values(chart, install),
        release=RELEASE,
        namespace=NAMESPACE,
    )
    yield r
    r.close()


def _key(obj: Obj) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def _by_key(docs: list[Obj]) -> dict[tuple[str, str], Obj]:
    return {_key(d): d for d in docs}


# ---------------------------------------------------------------- rendering


def test_every_rendered_object_validates(renderer: ChartRenderer) -> None:
    validator = IstioValidator(CRDS_PATH)
    for case, workload in WORKLOADS.items():
        docs = renderer.render(workload)
        assert docs, case
        assert [d for d in docs if ".istio.io/" in d["apiVersion"]] == []  # none rendered
        assert _problems(validator, docs) == [], case
        for d in docs:
            labels = d["metadata"]["labels"]
            assert labels[LABEL_MANAGED_BY] == MANAGED_BY
            assert labels[LABEL_AGENT] == workload.name


def test_the_chart_renders_the_same_agent_objects(
    chart: helm_python.Chart, install: Obj, renderer: ChartRenderer
) -> None:
    entries = [agent_entry(w) for w in WORKLOADS.values()]
    users = _docs(chart.render({**install, "agents": entries}, name=RELEASE, namespace=NAMESPACE))
    from_helm = _by_key([d for d in users if LABEL_AGENT in d["metadata"].get("labels", {})])
    from_runtime: dict[tuple[str, str], Obj] = {}
    for workload in WORKLOADS.values():
        from_runtime.update(_by_key(renderer.render(workload)))
    assert sorted(from_helm) == sorted(from_runtime)
    for key, obj in from_runtime.items():
        assert obj == from_helm[key], key
    # and the user's install itself still has the control plane (the runtime's has not)
    assert any(d["metadata"]["name"] == f"{RELEASE}-control-plane" for d in users)


def test_the_agent_pods_get_their_public_urls_and_issuers(
    install: Obj, renderer: ChartRenderer
) -> None:
    """The engine's card names the agent's Service; the sidecar trusts the chart's issuers;
    with Gateway API routes the runtime owns the agent's track Services too."""
    workload = WORKLOADS["canary"]
    docs = renderer.render(workload)
    istio = install.get("istio", {}).get("enabled", True)
    gateway_api = install.get("istio", {}).get("routes") == "gateway-api"
    host = f"{workload.name}.{NAMESPACE}.svc.cluster.local"
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert len(deployments) == 2  # stable + canary
    for d in deployments:
        containers = {c["name"]: c for c in d["spec"]["template"]["spec"]["containers"]}
        engine = {e["name"]: e.get("value") for e in containers["engine"]["env"]}
        sidecar = {e["name"]: e.get("value") for e in containers["sidecar"]["env"]}
        assert engine["SPECMESH_ENGINE_PUBLIC_HTTP_URL"] == f"http://{host}:{A2A_HTTP_PORT}"
        assert engine["SPECMESH_ENGINE_PUBLIC_GRPC_URL"] == f"{host}:{A2A_GRPC_PORT}"
        assert engine.get("SPECMESH_CARD_SECURITY") == ("bearer,mtls" if istio else None)
        issuers = parse_jwt_issuers(sidecar["SPECMESH_JWT_ISSUERS"] or "")
        assert issuers[0].issuer == "specmesh"
        assert [i.issuer for i in issuers[1:]] == [
            i["issuer"] for i in install.get("jwt", {}).get("issuers", [])
        ]
    services = sorted(d["metadata"]["name"] for d in docs if d["kind"] == "Service")
    tracks = [f"{workload.name}-canary", f"{workload.name}-stable"] if gateway_api else []
    assert services == sorted([workload.name, *tracks])
    for d in docs:
        if d["kind"] == "Service" and d["metadata"]["name"] in tracks:
            assert d["metadata"]["labels"][LABEL_AGENT] == workload.name  # pruned with it
            assert d["spec"]["selector"][LABEL_TRACK] == d["metadata"]["name"].rsplit("-", 1)[1]


def test_the_agent_pods_reach_the_install_values_task_store(
    install: Obj, renderer: ChartRenderer
) -> None:
    """The install's taskStore reaches every agent the controller renders: the engine's
    store is its sidecar's loopback proxy, the sidecar forwards to the shared Redis with the
    install's password (or, per agent, its own user and its own tree's password)."""
    store = install.get("taskStore", {})
    for name, workload in WORKLOADS.items():
        for d in renderer.render(workload):
            if d["kind"] != "Deployment":
                continue
            containers = {c["name"]: c for c in d["spec"]["template"]["spec"]["containers"]}
            engine = {e["name"]: e.get("value") for e in containers["engine"]["env"]}
            sidecar = {e["name"]: e.get("value") for e in containers["sidecar"]["env"]}
            if not store:
                assert "SPECMESH_TASK_STORE" not in engine, name  # in memory
                assert "SPECMESH_TASK_STORE_PROXY" not in sidecar, name
                continue
            proxy = sidecar["SPECMESH_TASK_STORE_PROXY"]
            assert engine["SPECMESH_TASK_STORE"] == f"redis://{proxy}/0", name
            assert engine["SPECMESH_TASK_RETENTION_SECONDS"] == str(
                store.get("retentionSeconds", 86400)
            )
            assert "SPECMESH_TASK_STORE_PASSWORD" not in engine  # the engine holds no secret
            if store.get("perAgentUser"):
                rn = workload.name
                assert sidecar["SPECMESH_TASK_STORE_UPSTREAM"] == (
                    f"redis://tasks-{rn}@redis.redis.svc:6379/0"
                )
                assert sidecar["SPECMESH_TASK_STORE_PASSWORD"] == (
                    f"vault://secret/specmesh/agents/{rn}/task-store#password"
                )
            else:
                assert sidecar["SPECMESH_TASK_STORE_UPSTREAM"] == store["upstream"]
                assert sidecar["SPECMESH_TASK_STORE_PASSWORD"] == store["passwordRef"]


def test_workloads_map_onto_the_charts_agent_entry(install: Obj, renderer: ChartRenderer) -> None:
    plain = _by_key(renderer.render(WORKLOADS["plain"]))
    tracks = (
        [("Service", "mse-nacos-helper-canary"), ("Service", "mse-nacos-helper-stable")]
        if install.get("istio", {}).get("routes") == "gateway-api"
        else []
    )
    assert sorted(plain) == [
        ("Deployment", "mse-nacos-helper-stable"),
        ("NetworkPolicy", "mse-nacos-helper"),
        ("PodDisruptionBudget", "mse-nacos-helper-stable"),
        ("Service", "mse-nacos-helper"),
        *tracks,
        ("ServiceAccount", "specmesh-agent-mse-nacos-helper"),
    ]
    assert plain[("Deployment", "mse-nacos-helper-stable")]["spec"]["replicas"] == 1

    canary = _by_key(renderer.render(WORKLOADS["canary"]))
    assert canary[("Deployment", "schedulex-assistant-stable")]["spec"]["replicas"] == 3
    assert canary[("Deployment", "schedulex-assistant-canary")]["spec"]["replicas"] == 2
    pod_labels = canary[("Deployment", "schedulex-assistant-canary")]["spec"]["template"]
    assert pod_labels["metadata"]["labels"][LABEL_TRACK] == "canary"

    scaled = _by_key(renderer.render(WORKLOADS["autoscaling"]))
    for track in ("stable", "canary"):
        hpa = scaled[("HorizontalPodAutoscaler", f"mse-gateway-assistant-{track}")]["spec"]
        assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 6)
        assert hpa["metrics"][0]["resource"]["target"]["averageUtilization"] == 60
        assert "replicas" not in scaled[("Deployment", f"mse-gateway-assistant-{track}")]["spec"]

    custom = _by_key(renderer.render(WORKLOADS["resources"]))
    containers = {
        c["name"]: c["resources"]
        for c in custom[("Deployment", "billing-bot-v2-stable")]["spec"]["template"]["spec"][
            "containers"
        ]
    }
    assert containers["engine"] == {
        "requests": {"cpu": "500m", "memory": "512Mi"},
        "limits": {"cpu": "2", "memory": "2Gi"},
    }
    # deep-merged over agentDefaults: the spec's limit added, the defaults kept
    assert containers["sidecar"] == {
        "requests": {"cpu": "50m", "memory": "128Mi"},
        "limits": {"cpu": "250m", "memory": "256Mi"},
    }

    stopped = _by_key(renderer.render(WORKLOADS["stopped"]))
    assert stopped[("Deployment", "idle-agent-stable")]["spec"]["replicas"] == 0

    released = _by_key(renderer.render(WORKLOADS["release-canary"]))
    assert ("Deployment", "a-b-c-d9-canary") in released  # the release's canary needs it


def test_objects_come_in_apply_order(renderer: ChartRenderer) -> None:
    docs = renderer.render(WORKLOADS["autoscaling"])
    kinds = [d["kind"] for d in docs]
    assert kinds.index("NetworkPolicy") < kinds.index("Deployment")
    assert kinds.index("ServiceAccount") < kinds.index("Deployment")
    assert kinds.index("Deployment") < kinds.index("HorizontalPodAutoscaler")


def test_a_request_above_the_default_limit_is_refused_naming_the_field(
    renderer: ChartRenderer,
) -> None:
    workload = _workload(
        "big", {"resources": {"engine": {"requests": {"memory": "2Gi"}}}}
    )  # agentDefaults: engine limit 1Gi
    with pytest.raises(ChartRenderError) as e:
        renderer.render(workload)
    assert "deployment.resources.engine: requests.memory 2Gi is above limits.memory 1Gi" in str(
        e.value
    )


def test_a_bad_chart_value_is_a_render_error(chart: helm_python.Chart) -> None:
    values = _install_values(chart, INSTALLS["defaults"])
    values["vault"]["addr"] = "not a url"
    r = ChartRenderer(chart_path=CHART, values=values, release=RELEASE, namespace=NAMESPACE)
    try:
        with pytest.raises(ChartRenderError, match="/vault/addr"):
            r.render(WORKLOADS["plain"])
    finally:
        r.close()


# ---------------------------------------------------------------- what the chart gives the runtime


def test_the_charts_rbac_grants_what_the_runtime_calls(chart: helm_python.Chart) -> None:
    for install in (INSTALLS["defaults"], INSTALLS["customised"]):
        docs = _docs(chart.render({**install, "agents": []}, name=RELEASE, namespace=NAMESPACE))
        (role,) = [d for d in docs if d["kind"] == "Role"]
        granted = role_grants(role)
        for res in KINDS.values():
            info = api_info(res).resource
            for verb in ("get", "list", "watch", "create", "patch", "delete"):
                assert (info.group, api_info(res).plural, verb) in granted
        for verb in ("get", "list", "watch"):
            assert ("", "pods", verb) in granted
        assert ("", "pods", "delete") not in granted
        (binding,) = [d for d in docs if d["kind"] == "RoleBinding"]
        assert binding["roleRef"]["name"] == role["metadata"]["name"]


def test_the_agents_rights_stay_in_the_release_namespace_when_rbac_is_cluster_wide(
    chart: helm_python.Chart,
) -> None:
    """``rbac.clusterWide`` widens the mesh publisher's Istio rights only: Deployments,
    ServiceAccounts... in every namespace would let a compromised control plane run pods
    as any ServiceAccount of the cluster, and the controller works in its own namespace."""
    install = {**INSTALLS["defaults"], "agents": [],
               "controlPlane": {"rbac": {"clusterWide": True}}}  # fmt: skip
    docs = _docs(chart.render(install, name=RELEASE, namespace=NAMESPACE))
    agent_kinds = {(api_info(r).resource.group, api_info(r).plural) for r in KINDS.values()}
    agent_kinds.add(("", "pods"))
    for cluster_role in (d for d in docs if d["kind"] == "ClusterRole"):
        granted = {(g, r) for rule in cluster_role["rules"] for g in rule["apiGroups"]
                   for r in rule["resources"]}  # fmt: skip
        assert granted & agent_kinds == set(), cluster_role["metadata"]["name"]
        assert {g for g, _ in granted} <= {"networking.istio.io", "security.istio.io"}
    (role,) = [d for d in docs if d["kind"] == "Role"]
    assert role["metadata"]["namespace"] == NAMESPACE
    granted = {(g, r) for rule in role["rules"] for g in rule["apiGroups"]
               for r in rule["resources"]}  # fmt: skip
    assert agent_kinds <= granted
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}  # fmt: skip


def test_the_control_plane_pod_gets_the_runtimes_settings(chart: helm_python.Chart) -> None:
    docs = _docs(
        chart.render({**INSTALLS["defaults"], "agents": []}, name=RELEASE, namespace=NAMESPACE)
    )
    (cp,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = cp["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is True  # it calls the API
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    defaults = KubernetesRuntimeSettings.model_fields
    assert env["SPECMESH_RUNTIME"] == "kubernetes"
    assert env["SPECMESH_AGENTS_NAMESPACE"] == "$(POD_NAMESPACE)"
    assert env["SPECMESH_CHART_RELEASE"] == RELEASE
    assert env["SPECMESH_CHART_PATH"] == str(defaults["chart_path"].default)
    assert env["SPECMESH_CHART_VALUES"] == str(defaults["chart_values"].default)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert Path(env["SPECMESH_CHART_VALUES"]).parent == Path(mounts["chart-values"])
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert volumes["chart-values"]["configMap"]["name"] == cm["metadata"]["name"]
    assert "values.yaml" in cm["data"]
    assert "checksum/chart-values" in cp["spec"]["template"]["metadata"]["annotations"]


# ---------------------------------------------------------------- apply/prune, the fake API


@pytest.fixture
async def api() -> AsyncIterator[tuple[FakeKubeApi, str]]:
    fake = FakeKubeApi()
    async with serving(fake) as url:
        yield fake, url


def _client(url: str) -> AsyncClient:
    """The real lightkube client, pointed at ``url`` with a bearer token."""
    config = KubeConfig.from_one(
        cluster=Cluster(server=url), user=User(token="cp-token"), namespace=NAMESPACE
    )
    return AsyncClient(config, trust_env=False)


@pytest.fixture
async def runtime(
    api: tuple[FakeKubeApi, str], chart: helm_python.Chart
) -> AsyncIterator[KubernetesRuntime]:
    _, url = api
    client = _client(url)
    renderer = ChartRenderer(
        chart_path=CHART,
        values=_install_values(chart, INSTALLS["defaults"]),
        release=RELEASE,
        namespace=NAMESPACE,
    )
    rt = KubernetesRuntime(client=client, renderer=renderer, namespace=NAMESPACE)
    yield rt
    await rt.close()


def _stored(fake: FakeKubeApi, obj: Obj) -> Obj:
    """A stored object less what the server adds."""
    plural = next(p for (_, _, p), kind in FAKE_KINDS.items() if kind == obj["kind"])
    stored = copy.deepcopy(fake.get(plural, obj["metadata"]["name"]))
    for key in ("uid", "resourceVersion", "creationTimestamp", "managedFields"):
        stored["metadata"].pop(key)
    return stored


def _deleted(fake: FakeKubeApi, since: int) -> set[tuple[str, str]]:
    return {(c.plural, str(c.name)) for c in fake.calls[since:] if c.method == "DELETE"}


async def test_apply_prune_and_remove_touch_exactly_the_agents_objects(
    api: tuple[FakeKubeApi, str], runtime: KubernetesRuntime
) -> None:
    fake, _ = api
    a = WORKLOADS["autoscaling"]  # mse-gateway-assistant: canary + HPAs
    b = WORKLOADS["plain"]  # mse-nacos-helper
    # An object an old `helm install` left, with the agent's label but Helm's managed-by:
    # not the runtime's, never pruned.
    foreign = {"apiVersion": "v1", "kind": "Service", "metadata": {
        "name": "mse-gateway-assistant-legacy", "namespace": NAMESPACE,
        "labels": {LABEL_AGENT: "mse-gateway-assistant", LABEL_MANAGED_BY: "Helm"}}}  # fmt: skip
    fake.put(foreign, manager="helm")
    # b's Deployment, left by Helm: applying takes it over (force).
    fake.put((await runtime.render(b))[-1], manager="helm")

    await runtime.apply(a)
    await runtime.apply(b)

    rendered = {w.name: await runtime.render(w) for w in (a, b)}
    patches = [c for c in fake.calls if c.method == "PATCH"]
    assert len(patches) == len(rendered[a.name]) + len(rendered[b.name]) == 9 + 5
    assert {c.authorization for c in fake.calls} == {"Bearer cp-token"}
    for call in patches:
        assert call.content_type == APPLY_PATCH
        assert call.query == {"fieldManager": FIELD_MANAGER, "force": "true"}
    for objs in rendered.values():
        for obj in objs:
            assert _stored(fake, obj) == obj
    assert fake.names("horizontalpodautoscalers") == {
        "mse-gateway-assistant-stable",
        "mse-gateway-assistant-canary",
    }
    assert [c for c in fake.calls if c.method == "DELETE"] == []
    lists = [c for c in fake.calls if c.method == "GET" and c.name is None]
    assert {c.query["labelSelector"] for c in lists} == {
        f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_INSTANCE}={RELEASE},{LABEL_AGENT}={rn}"
        for rn in (a.name, b.name)
    }
    assert await runtime.running() == {"mse-gateway-assistant", "mse-nacos-helper"}

    # a drops its canary and its autoscaling: exactly those objects go
    smaller = _workload("mse-gateway-assistant", {"tracks": {"stable": {"replicas": 2}}})
    before = len(fake.calls)
    await runtime.apply(smaller)
    assert _deleted(fake, before) == {
        ("deployments", "mse-gateway-assistant-canary"),
        ("poddisruptionbudgets", "mse-gateway-assistant-canary"),
        ("horizontalpodautoscalers", "mse-gateway-assistant-stable"),
        ("horizontalpodautoscalers", "mse-gateway-assistant-canary"),
    }
    propagation = {c.query.get("propagationPolicy") for c in fake.calls[before:]
                   if c.method == "DELETE"}  # fmt: skip
    assert propagation == {"Background"}
    assert fake.get("deployments", "mse-gateway-assistant-stable")["spec"]["replicas"] == 2
    assert all(b.name not in c.path and b.name not in c.query.get("labelSelector", "")
               for c in fake.calls[before:])  # fmt: skip

    # applying again changes nothing but re-applies (idempotent)
    before = len(fake.calls)
    await runtime.apply(smaller)
    assert _deleted(fake, before) == set()

    # remove a: exactly its objects, b's and the foreign one untouched
    b_objects = {k: v for k, v in fake.objects.items() if "mse-nacos-helper" in k[4]}
    before = len(fake.calls)
    await runtime.remove("mse-gateway-assistant")
    assert _deleted(fake, before) == {
        ("networkpolicies", "mse-gateway-assistant"),
        ("poddisruptionbudgets", "mse-gateway-assistant-stable"),
        ("serviceaccounts", "specmesh-agent-mse-gateway-assistant"),
        ("services", "mse-gateway-assistant"),
        ("deployments", "mse-gateway-assistant-stable"),
    }
    assert {k: v for k, v in fake.objects.items() if "mse-nacos-helper" in k[4]} == b_objects
    assert fake.names("services") == {"mse-nacos-helper", "mse-gateway-assistant-legacy"}
    assert await runtime.running() == {"mse-nacos-helper"}

    # removing what is gone is fine, and deletes nothing
    before = len(fake.calls)
    await runtime.remove("mse-gateway-assistant")
    assert _deleted(fake, before) == set()


async def test_apply_never_takes_over_or_prunes_an_object_it_does_not_own(
    api: tuple[FakeKubeApi, str], runtime: KubernetesRuntime
) -> None:
    """An agent's object names (``<rn>``, ``<rn>-<track>``, ``specmesh-agent-<rn>``) can be
    those of objects in the namespace that are not its: the control plane's own Service, a
    namespace-wide NetworkPolicy, another release's agent. Applying the agent refuses
    before writing anything, and never adopts (force) or later prunes such an object."""
    fake, _ = api
    control_plane_svc = {"apiVersion": "v1", "kind": "Service", "metadata": {
        "name": f"{RELEASE}-control-plane", "namespace": NAMESPACE,
        "labels": {LABEL_MANAGED_BY: "Helm", LABEL_INSTANCE: RELEASE}},
        "spec": {"selector": {"app.kubernetes.io/component": "control-plane"}}}  # fmt: skip
    deny_all = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {
        "name": "default-deny", "namespace": NAMESPACE},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}}  # fmt: skip
    fake.put(control_plane_svc, manager="helm")
    fake.put(deny_all, manager="kubectl")
    # another release's agent in the same namespace: its labels but another instance
    other = copy.deepcopy((await runtime.render(WORKLOADS["plain"]))[0])
    other["metadata"]["labels"][LABEL_INSTANCE] = "staging"
    fake.put(other, manager=FIELD_MANAGER)
    before = copy.deepcopy(fake.objects)

    taken_by = {
        f"{RELEASE}-control-plane": f"Service/{RELEASE}-control-plane",
        "default-deny": "NetworkPolicy/default-deny",
        "mse-nacos-helper": f"{other['kind']}/{other['metadata']['name']}",
    }
    for agent, taken in taken_by.items():
        with pytest.raises(ObjectNotOwnedError, match=taken):
            await runtime.apply(_workload(agent, {}))
    assert fake.mutations() == []
    assert fake.objects == before

    # not this release's: not running here, so never pruned, and removing leaves it
    assert await runtime.running() == set()
    await runtime.remove("mse-nacos-helper")
    await runtime.remove("default-deny")
    assert fake.mutations() == []


async def test_observe_maps_the_agents_pods(
    api: tuple[FakeKubeApi, str], runtime: KubernetesRuntime
) -> None:
    fake, _ = api

    def pod(name: str, track: str, status: Obj, agent: str = "schedulex-assistant") -> Obj:
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": name, "namespace": NAMESPACE,
            "labels": {LABEL_AGENT: agent, LABEL_TRACK: track, LABEL_INSTANCE: RELEASE}},
            "status": status}  # fmt: skip

    ready = {"type": "Ready", "status": "True", "lastTransitionTime": "2026-11-30T00:01:00Z"}
    image = {"image": "registry.example.com/specmesh:0.1.0", "imageID": ""}
    fake.put(pod("s-1", "stable", {"phase": "Running", "podIP": "10.0.0.7", "conditions": [ready],
             "containerStatuses": [{"name": "sidecar", "ready": True, "restartCount": 1, **image},
                                   {"name": "engine", "ready": True, "restartCount": 2,
                                    **image}]}))  # fmt: skip
    fake.put(pod("c-1", "canary", {"phase": "Running", "containerStatuses": [
        {"name": "sidecar", "ready": True, "restartCount": 0, **image},
        {"name": "engine", "ready": False, "restartCount": 5, **image,
         "state": {"waiting": {"reason": "CrashLoopBackOff"}},
         "lastState": {"terminated": {"exitCode": 3, "reason": "Error"}}}]}))  # fmt: skip
    fake.put(pod("other", "stable", {"phase": "Running"}, agent="mse-nacos-helper"))

    instances = await runtime.observe("scheduleX-assistant")

    assert [(i.instance, i.track, i.phase, i.ready, i.restarts) for i in instances] == [
        ("c-1", "canary", "CrashLoop", False, 5),
        ("s-1", "stable", "Running", True, 3),
    ]
    assert instances[0].last_error == "engine: exited 3 (Error)"
    assert instances[1].since == "2026-11-30T00:01:00Z"
    assert instances[1].endpoints == {"inbound": "10.0.0.7:8080", "ops": "10.0.0.7:9090"}
    (call,) = [c for c in fake.calls if c.plural == "pods" and c.method == "GET"]
    assert call.query["labelSelector"] == (
        f"{LABEL_INSTANCE}={RELEASE},{LABEL_AGENT}=schedulex-assistant"
    )

    # a pod the API serves without what every pod has: an error of the runtime, typed
    fake.put(pod("broken", "stable", {"containerStatuses": [{"name": "engine"}]}))
    with pytest.raises(KubernetesRuntimeError, match="unexpected answer"):
        await runtime.observe("scheduleX-assistant")


async def test_observe_all_lists_every_agents_pods_at_once(
    api: tuple[FakeKubeApi, str], runtime: KubernetesRuntime
) -> None:
    fake, _ = api
    for name, agent, track in (
        ("a-2", "schedulex-assistant", "stable"),
        ("a-1", "schedulex-assistant", "canary"),
        ("b-1", "mse-nacos-helper", "stable"),
    ):
        fake.put({"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": name, "namespace": NAMESPACE,
            "labels": {LABEL_AGENT: agent, LABEL_TRACK: track, LABEL_INSTANCE: RELEASE}},
            "status": {"phase": "Pending"}})  # fmt: skip

    seen = await runtime.observe_all()

    assert {a: [(i.instance, i.track) for i in found] for a, found in seen.items()} == {
        "schedulex-assistant": [("a-1", "canary"), ("a-2", "stable")],
        "mse-nacos-helper": [("b-1", "stable")],
    }
    (call,) = [c for c in fake.calls if c.plural == "pods" and c.method == "GET"]
    assert call.query["labelSelector"] == f"{LABEL_INSTANCE}={RELEASE}"


async def test_api_errors_are_translated(
    api: tuple[FakeKubeApi, str], runtime: KubernetesRuntime
) -> None:
    fake, _ = api
    fake.refuse[("PATCH", "deployments")] = 403
    with pytest.raises(KubernetesRefusedError) as refused:
        await runtime.apply(WORKLOADS["plain"])
    assert refused.value.status == 403
    assert "apply Deployment/mse-nacos-helper-stable" in str(refused.value)

    closed = _client("http://127.0.0.1:9")
    renderer = runtime._renderer
    down = KubernetesRuntime(client=closed, renderer=renderer, namespace=NAMESPACE)
    with pytest.raises(KubernetesUnavailableError):
        await down.running()
    await closed.close()


async def test_the_factory_reads_the_settings_the_chart_sets(
    api: tuple[FakeKubeApi, str],
    chart: helm_python.Chart,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake, url = api
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(_install_values(chart, INSTALLS["customised"])))
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": url}}],
        "users": [{"name": "cp", "user": {"token": "t0ken"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "cp"}}],
    }))  # fmt: skip
    for name, value in {
        "SPECMESH_AGENTS_NAMESPACE": "team-a",
        "SPECMESH_CHART_PATH": str(CHART),
        "SPECMESH_CHART_VALUES": str(values),
        "SPECMESH_CHART_RELEASE": "prod",
        "SPECMESH_KUBECONFIG": str(kubeconfig),
    }.items():
        monkeypatch.setenv(name, value)
    rt: Runtime = kubernetes_runtime_from_env(vault=None)
    try:
        await rt.apply(WORKLOADS["plain"])
        assert rt.name == "kubernetes"
        assert await rt.running() == {"mse-nacos-helper"}
    finally:
        await rt.close()
    deployment = fake.get("deployments", "mse-nacos-helper-stable", namespace="team-a")
    assert deployment["metadata"]["labels"]["app.kubernetes.io/instance"] == "prod"
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image.startswith("registry.example.com/specmesh@sha256:")
    assert all("/namespaces/team-a/" in c.path for c in fake.calls)
    assert {c.authorization for c in fake.calls} == {"Bearer t0ken"}


# ---------------------------------------------------------------- pods -> instances


def _pod(status: Obj, **meta: Any) -> Obj:
    return {"metadata": {"name": "p", "labels": {LABEL_TRACK: "canary"}, **meta},
            "status": status}  # fmt: skip


RUNNING_READY = {"phase": "Running", "containerStatuses": [{"name": "sidecar", "ready": True},
                 {"name": "engine", "ready": True}]}  # fmt: skip

PODS: list[tuple[str, Obj, str, bool]] = [
    ("running and ready", _pod(RUNNING_READY), "Running", True),
    ("pending", _pod({"phase": "Pending"}), "Starting", False),
    (
        "creating",
        _pod(
            {
                "phase": "Pending",
                "containerStatuses": [
                    {"name": "engine", "state": {"waiting": {"reason": "ContainerCreating"}}}
                ],
            }
        ),
        "Starting",
        False,
    ),
    (
        "running, engine not ready",
        _pod(
            {
                "phase": "Running",
                "containerStatuses": [{"name": "sidecar", "ready": True}, {"name": "engine"}],
            }
        ),
        "Starting",
        False,
    ),
    (
        "crash loop",
        _pod(
            {
                "phase": "Running",
                "containerStatuses": [
                    {
                        "name": "engine",
                        "restartCount": 4,
                        "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    }
                ],
            }
        ),
        "CrashLoop",
        False,
    ),
    (
        "image cannot be pulled",
        _pod(
            {
                "phase": "Pending",
                "containerStatuses": [
                    {
                        "name": "engine",
                        "state": {
                            "waiting": {"reason": "ImagePullBackOff", "message": "no such image"}
                        },
                    }
                ],
            }
        ),
        "Failed",
        False,
    ),
    ("pod failed", _pod({"phase": "Failed", "reason": "Evicted"}), "Failed", False),
    (
        "being deleted",
        _pod(RUNNING_READY, deletionTimestamp="2026-11-30T00:00:00Z"),
        "Stopping",
        False,
    ),
]


@pytest.mark.parametrize(("pod", "phase", "ready"), [p[1:] for p in PODS], ids=[p[0] for p in PODS])
def test_pod_phases(pod: Obj, phase: str, ready: bool) -> None:
    instance = pod_instance(pod)
    assert (instance.phase, instance.ready, instance.track) == (phase, ready, "canary")
    assert instance.revision == 0


def test_pod_restarts_and_errors() -> None:
    crash = pod_instance(PODS[4][1])
    assert crash.restarts == 4
    pulled = pod_instance(PODS[5][1])
    assert pulled.last_error == "ImagePullBackOff: no such image"
    assert pod_instance(PODS[6][1]).last_error == "Evicted"
    assert pod_instance(PODS[7][1]).since == "2026-11-30T00:00:00Z"
