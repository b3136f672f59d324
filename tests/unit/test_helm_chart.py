"""The Helm chart, rendered with real Helm (helm-python-sdk bundles Helm's Go SDK).

Every rendered object is validated: core objects with kubernetes-validate (strict, the
newest Kubernetes it ships), Istio objects against the vendored ``control_plane/istio/`` CRDs.
Bad values are refused by ``values.schema.json`` (or the chart's own checks) with a message
that names the field. And the chart is joined with the control plane's mesh objects: the
DestinationRule subsets and AuthorizationPolicies select pods and principals the chart
really renders.
"""

from __future__ import annotations

import copy
import json
import os
import re
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml
from pydantic_settings import BaseSettings

from control_plane.istio import CRDS_PATH
from control_plane.mesh import (
    IstioValidator,
    MeshSettings,
    render_agent,
    render_mesh,
)
from control_plane.settings import ControlPlaneSettings
from engine.main import ServeSettings
from engine.tasks import DEFAULT_RETENTION_SECONDS
from sidecar.settings import SidecarSettings
from specmesh.issuers import JwtIssuer, parse_jwt_issuers
from specmesh.k8s import (
    A2A_GRPC_PORT,
    A2A_HTTP_PORT,
    LABEL_AGENT,
    LABEL_TRACK,
    service_account_name,
    service_name,
)
from specmesh.names import resource_name
from specmesh.secrets import VaultRef
from specmesh.spec.models import ReleaseSpec
from specmesh.vault import agent_policy, agent_secret_prefix

from ..conftest import REPO
from .kube_api import role_grants

CHART = REPO / "helm" / "specmesh"
NAMESPACE = "agents"
RELEASE = "specmesh"
KUBE_VERSION = kubernetes_validate.latest_version()

Obj = dict[str, Any]

BASE: Obj = {
    "etcd": {"endpoint": "http://etcd.etcd.svc.cluster.local:2379"},
    "vault": {"addr": "https://vault.vault.svc.cluster.local:8200"},
}
EXAMPLES = ["mse-nacos-helper", "mse-gateway-assistant", "scheduleX-assistant"]


def _values(**overrides: Any) -> Obj:
    values = copy.deepcopy(BASE)
    values.update(overrides)
    return values


MATRIX: dict[str, Obj] = {
    "one-agent": _values(agents=[{"name": "mse-nacos-helper"}]),
    "many-agents": _values(
        agents=[{"name": n} for n in [*EXAMPLES, "billing_bot.v2"]],
    ),
    "canary-on": _values(
        agents=[
            {
                "name": "scheduleX-assistant",
                "tracks": {"stable": {"replicas": 3}, "canary": {"enabled": True}},
            }
        ]
    ),
    "autoscaling-on": _values(
        agents=[
            {
                "name": "mse-gateway-assistant",
                "tracks": {"canary": {"enabled": True, "replicas": 1}},
                "autoscaling": {"enabled": True, "min": 2, "max": 8, "targetCPU": 60},
            }
        ]
    ),
    "istio-off": _values(
        istio={"enabled": False},
        agents=[{"name": n, "tracks": {"canary": {"enabled": True}}} for n in EXAMPLES],
    ),
    "gateway-api": _values(
        istio={"enabled": True, "routes": "gateway-api"},
        jwt={
            "controlPlaneIssuer": "specmesh",
            "issuers": [
                {
                    "issuer": "https://idp.example.com",
                    "jwksUri": "https://idp.example.com/.well-known/jwks.json",
                    "audiences": ["{agent}", "agents"],
                }
            ],
        },
        agents=[{"name": n, "tracks": {"canary": {"enabled": True}}} for n in EXAMPLES],
    ),
    "everything": _values(
        image={"repository": "registry.example.com/specmesh", "digest": "sha256:" + "a" * 64},
        imagePullSecrets=[{"name": "regcred"}],
        vault={
            "addr": "https://vault.example.com:8200",
            "tokenAudience": "vault",
            "caConfigMap": {"name": "vault-ca", "key": "ca.crt"},
        },
        otel={
            "endpoint": "http://otel-collector.observability.svc:4317",
            "resourceAttributes": "deployment.environment=prod",
            "headersSecret": {"name": "otel-headers", "key": "headers"},
        },
        controlPlane={"replicas": 2, "rbac": {"clusterWide": True}},
        agentDefaults={"autoscaling": {"enabled": True, "min": 2, "max": 4}},
        agents=[
            {
                "name": "mse-nacos-helper",
                "tracks": {"canary": {"enabled": True}},
                "resources": {"engine": {"requests": {"cpu": "1", "memory": "1Gi"}}},
                "env": {"engine": [{"name": "SPECMESH_MAX_STEPS", "value": "12"}]},
                "nodeSelector": {"kubernetes.io/os": "linux"},
                "tolerations": [{"key": "agents", "operator": "Exists", "effect": "NoSchedule"}],
            },
            {"name": "scheduleX-assistant", "podDisruptionBudget": {"enabled": False}},
        ],
        networkPolicy={
            "ingress": {
                "a2aFrom": [
                    {
                        "namespaceSelector": {
                            "matchLabels": {"kubernetes.io/metadata.name": "istio-ingress"}
                        }
                    }
                ]
            },
            "egress": {
                "etcd": {
                    "ports": [2379],
                    "to": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {"kubernetes.io/metadata.name": "etcd"}
                            }
                        }
                    ],
                },
                "vault": {"ports": [8200], "to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}]},
                "externalHttps": False,
                "extra": [{"ports": [{"port": 5432, "protocol": "TCP"}]}],
            },
        },
    ),
    # the A2A task store, one Redis user for every agent (its own port, a database)
    "task-store-shared": _values(
        taskStore={
            "upstream": "redis://specmesh-tasks@redis.redis.svc.cluster.local:6380/2",
            "passwordRef": "vault://secret/specmesh/infra/task-store#password",
            "retentionSeconds": 3600,
        },
        networkPolicy={
            "egress": {
                "taskStore": {
                    "to": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {"kubernetes.io/metadata.name": "redis"}
                            }
                        }
                    ]
                }
            }
        },
        agents=[{"name": n, "tracks": {"canary": {"enabled": True}}} for n in EXAMPLES],
    ),
    # ... and one Redis ACL user per agent, its password in the agent's own tree
    "task-store-per-agent": _values(
        istio={"enabled": False},
        vault={"addr": "https://vault.vault.svc.cluster.local:8200", "kvMount": "kv"},
        taskStore={"upstream": "rediss://redis.redis.svc.cluster.local/0", "perAgentUser": True},
        agents=[{"name": n} for n in [*EXAMPLES, "billing_bot.v2"]],
    ),
}


@pytest.fixture(scope="module")
def chart() -> Iterator[helm_python.Chart]:
    with helm_python.Chart.load(CHART) as c:
        yield c


@pytest.fixture(scope="module")
def validator() -> IstioValidator:
    return IstioValidator(CRDS_PATH)


def _render(chart: helm_python.Chart, values: Obj) -> list[Obj]:
    manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    docs: list[Obj] = []
    for template, text in sorted(manifests.items()):
        if not template.endswith((".yaml", ".yml")):
            continue  # NOTES.txt
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def _of(docs: list[Obj], kind: str) -> list[Obj]:
    return [d for d in docs if d["kind"] == kind]


def _names(docs: list[Obj], kind: str) -> set[str]:
    return {d["metadata"]["name"] for d in _of(docs, kind)}


def _env(container: Obj) -> dict[str, str]:
    return {e["name"]: e.get("value", "<valueFrom>") for e in container.get("env", [])}


def _containers(deployment: Obj) -> dict[str, Obj]:
    return {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}


# ---------------------------------------------------------------- every object validates


def _problems(validator: IstioValidator, docs: list[Obj]) -> list[str]:
    """Core objects against Kubernetes' schema (strict), Istio ones against the CRDs."""
    problems: list[str] = []
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if ".istio.io/" in doc["apiVersion"]:
            problems.extend(validator.problems(doc))
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            problems.append(f"{where}: {path}: {e.message}")
        if doc["metadata"].get("namespace", NAMESPACE) != NAMESPACE:
            problems.append(f"{where}: metadata.namespace: not the release namespace")
    return problems


@pytest.mark.parametrize("case", list(MATRIX))
def test_every_rendered_object_validates(
    chart: helm_python.Chart, validator: IstioValidator, case: str
) -> None:
    docs = _render(chart, MATRIX[case])
    assert docs
    assert _problems(validator, docs) == []


def test_the_validation_catches_a_broken_object(
    chart: helm_python.Chart, validator: IstioValidator
) -> None:
    docs = _render(chart, MATRIX["one-agent"])
    broken = copy.deepcopy(next(d for d in docs if d["kind"] == "Deployment"))
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRoot"] = True
    istio = {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
             "metadata": {"name": "default"}, "spec": {"mtls": {"mode": "LOOSE"}}}  # fmt: skip
    problems = _problems(validator, [broken, istio])
    assert len(problems) == 2
    assert "readOnlyRoot" in problems[0] and "spec.mtls.mode" in problems[1]


def test_matrix_renders_the_expected_objects(chart: helm_python.Chart) -> None:
    one = _render(chart, MATRIX["one-agent"])
    assert _names(one, "Deployment") == {"mse-nacos-helper-stable", "specmesh-control-plane"}
    assert _names(one, "Service") == {"mse-nacos-helper", "specmesh-control-plane"}
    assert _names(one, "PodDisruptionBudget") == {"mse-nacos-helper-stable"}
    assert _names(one, "NetworkPolicy") == {"mse-nacos-helper"}
    assert _of(one, "HorizontalPodAutoscaler") == []
    assert _names(one, "Role") == _names(one, "RoleBinding") == {"specmesh-control-plane"}

    many = _render(chart, MATRIX["many-agents"])
    assert len(_of(many, "Deployment")) == 4 + 1
    assert _names(many, "Service") >= {"schedulex-assistant", "billing-bot-v2"}

    canary = _render(chart, MATRIX["canary-on"])
    deployments = {d["metadata"]["name"]: d for d in _of(canary, "Deployment")}
    assert deployments["schedulex-assistant-stable"]["spec"]["replicas"] == 3
    assert deployments["schedulex-assistant-canary"]["spec"]["replicas"] == 1
    assert _names(canary, "PodDisruptionBudget") == {
        "schedulex-assistant-stable",
        "schedulex-assistant-canary",
    }

    scaled = _render(chart, MATRIX["autoscaling-on"])
    hpas = {h["metadata"]["name"]: h for h in _of(scaled, "HorizontalPodAutoscaler")}
    assert set(hpas) == {"mse-gateway-assistant-stable", "mse-gateway-assistant-canary"}
    hpa = hpas["mse-gateway-assistant-stable"]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "mse-gateway-assistant-stable",
    }
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 8)
    assert hpa["metrics"][0]["resource"]["target"]["averageUtilization"] == 60
    for d in _of(scaled, "Deployment"):
        if d["metadata"]["name"].startswith("mse-gateway-assistant"):
            assert "replicas" not in d["spec"]  # the HPA owns it

    everything = _render(chart, MATRIX["everything"])
    # rbac.clusterWide: the Istio rights cluster-wide, the agents' objects in the namespace
    assert _names(everything, "ClusterRole") == _names(everything, "ClusterRoleBinding")
    assert _names(everything, "ClusterRole") == {"specmesh-control-plane-mesh"}
    assert (
        _names(everything, "Role")
        == _names(everything, "RoleBinding")
        == {"specmesh-control-plane"}
    )


# ---------------------------------------------------------------- names and labels


NAMES = [
    "scheduleX-assistant",
    "mse-nacos-helper",
    "Billing_Bot.v2",
    "a",
    "A.B_C-d9",
    "x" * 63,
]


def test_resource_name_helper_matches_specmesh_names(chart: helm_python.Chart) -> None:
    docs = _render(chart, _values(agents=[{"name": n} for n in NAMES]))
    services = _names(docs, "Service") - {"specmesh-control-plane"}
    assert services == {service_name(n) for n in NAMES} == {resource_name(n) for n in NAMES}
    accounts = _names(docs, "ServiceAccount") - {"specmesh-control-plane"}
    assert accounts == {service_account_name(n) for n in NAMES}
    for d in _of(docs, "Deployment"):
        if d["metadata"]["name"] == "specmesh-control-plane":
            continue
        env = _env(_containers(d)["sidecar"])
        name = env["AGENT_NAME"]  # the logical name, unchanged
        assert name in NAMES
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert labels[LABEL_AGENT] == resource_name(name)
        assert d["spec"]["template"]["spec"]["serviceAccountName"] == service_account_name(name)
        assert env["SPECMESH_VAULT_K8S_ROLE"] == service_account_name(name)


def test_agent_pods_carry_the_shared_labels_and_env(chart: helm_python.Chart) -> None:
    docs = _render(chart, MATRIX["canary-on"])
    for track in ("stable", "canary"):
        d = next(x for x in _of(docs, "Deployment") if x["metadata"]["name"].endswith(track))
        pod = d["spec"]["template"]
        labels = pod["metadata"]["labels"]
        assert {k: labels[k] for k in (LABEL_AGENT, LABEL_TRACK, "app", "version")} == {
            LABEL_AGENT: "schedulex-assistant",
            LABEL_TRACK: track,
            "app": "schedulex-assistant",
            "version": track,
        }
        assert d["spec"]["selector"]["matchLabels"] == {
            LABEL_AGENT: "schedulex-assistant",
            LABEL_TRACK: track,
        }
        containers = _containers(d)
        assert set(containers) == {"engine", "sidecar"}
        for role in ("engine", "sidecar"):  # `specmesh <role>`'s main without the CLI's imports
            assert containers[role]["command"] == ["/usr/bin/tini", "--", "python", "-m", role]
            assert "args" not in containers[role]
        assert containers["engine"]["image"] == containers["sidecar"]["image"]
        assert _env(containers["sidecar"])["SPECMESH_TRACK"] == track  # the sidecar resolves it
        for c in containers.values():
            env = _env(c)
            assert env["AGENT_NAME"] == "scheduleX-assistant"
            assert env["SPECMESH_SYNC_ADDR"] == "unix:///run/specmesh/sync.sock"
            assert env["SPECMESH_EGRESS_URL"] == "http://127.0.0.1:7102"
            assert env["SPECMESH_ENGINE_HTTP"] == "127.0.0.1:7103"
            assert env["SPECMESH_ENGINE_GRPC"] == "127.0.0.1:7104"
            mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
            assert mounts["run"] == "/run/specmesh"  # the shared socket volume
            assert mounts.keys() >= {"run"} and "/tmp" in mounts.values()
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["runAsNonRoot"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert c["readinessProbe"] and c["livenessProbe"] and c["resources"]["requests"]
        sidecar = _env(containers["sidecar"])
        assert sidecar["SPECMESH_INBOUND"].endswith(f":{A2A_HTTP_PORT}")
        assert sidecar["SPECMESH_OPS"] == "0.0.0.0:9090"
        assert sidecar["SPECMESH_ETCD_ENDPOINT"] == BASE["etcd"]["endpoint"]
        assert sidecar["SPECMESH_ETCD_PREFIX"] == "/specmesh"
        assert sidecar["SPECMESH_VAULT_ADDR"] == BASE["vault"]["addr"]
        assert sidecar["SPECMESH_ISTIO"] == "true"
        assert "SPECMESH_VAULT_ADDR" not in _env(containers["engine"])  # no secrets there
        ports = {p["name"]: p["containerPort"] for p in containers["sidecar"]["ports"]}
        assert ports == {"http-a2a": A2A_HTTP_PORT, "grpc-a2a": A2A_GRPC_PORT, "http-ops": 9090}
        assert "ports" not in containers["engine"]  # reached through the sidecar only
        spec = pod["spec"]
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert "emptyDir" in volumes["run"]
        assert "serviceAccountToken" in volumes["vault-token"]["projected"]["sources"][0]


def test_agent_service_selects_the_agent_only_with_named_ports(chart: helm_python.Chart) -> None:
    docs = _render(chart, MATRIX["canary-on"])
    svc = next(s for s in _of(docs, "Service") if s["metadata"]["name"] == "schedulex-assistant")
    assert svc["spec"]["selector"] == {LABEL_AGENT: "schedulex-assistant"}  # both tracks
    assert [(p["name"], p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [
        ("http-a2a", A2A_HTTP_PORT, "http-a2a"),
        ("grpc-a2a", A2A_GRPC_PORT, "grpc-a2a"),
    ]


def test_istio_on_and_off(chart: helm_python.Chart) -> None:
    on = _render(chart, MATRIX["canary-on"])
    off = _render(chart, MATRIX["istio-off"])
    for d in _of(on, "Deployment"):
        assert d["spec"]["template"]["metadata"]["labels"]["sidecar.istio.io/inject"] == "true"
    for d in _of(off, "Deployment"):
        meta = d["spec"]["template"]["metadata"]
        keys = [*meta.get("labels", {}), *meta.get("annotations", {})]
        assert not [k for k in keys if "istio.io" in k], d["metadata"]["name"]
        for c in d["spec"]["template"]["spec"]["containers"]:
            assert _env(c).get("SPECMESH_ISTIO", "false") == "false"
        if d["metadata"]["name"] != "specmesh-control-plane":
            sidecar = _env(_containers(d)["sidecar"])
            assert sidecar["SPECMESH_VAULT_PKI_MOUNT"] == "specmesh-pki"
    # (the control plane's copy of the install values names istio.enabled: false)
    off_text = yaml.safe_dump_all([d for d in off if d["kind"] != "ConfigMap"])
    assert "istio" not in off_text.replace("SPECMESH_ISTIO", "")


def test_otel_settings_become_env(chart: helm_python.Chart) -> None:
    docs = _render(chart, MATRIX["everything"])
    for d in _of(docs, "Deployment"):
        for c in d["spec"]["template"]["spec"]["containers"]:
            env = _env(c)
            assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == MATRIX["everything"]["otel"]["endpoint"]
            assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"
            assert env["OTEL_EXPORTER_OTLP_HEADERS"] == "<valueFrom>"
            assert "deployment.environment=prod" in env["OTEL_RESOURCE_ATTRIBUTES"]
    plain = _render(chart, MATRIX["one-agent"])
    for d in _of(plain, "Deployment"):
        for c in d["spec"]["template"]["spec"]["containers"]:
            assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in _env(c)


def test_control_plane_service_ports_and_rbac(chart: helm_python.Chart) -> None:
    docs = _render(chart, MATRIX["one-agent"])
    svc = next(s for s in _of(docs, "Service") if s["metadata"]["name"] == "specmesh-control-plane")
    assert [(p["name"], p["port"]) for p in svc["spec"]["ports"]] == [
        ("http-api", 8090),
        ("grpc-api", 8091),
    ]
    (role,) = _of(docs, "Role")
    granted = role_grants(role)
    for group, resources in {
        "networking.istio.io": ["virtualservices", "destinationrules"],
        "security.istio.io": ["authorizationpolicies", "peerauthentications"],
    }.items():
        for resource in resources:
            for verb in ("get", "list", "create", "patch", "delete"):
                assert (group, resource, verb) in granted
    (binding,) = _of(docs, "RoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "specmesh-control-plane", "namespace": NAMESPACE}
    ]
    cp = next(
        d for d in _of(docs, "Deployment") if d["metadata"]["name"] == svc["metadata"]["name"]
    )
    assert cp["spec"]["template"]["spec"]["containers"][0]["args"] == ["control-plane"]
    custom = _render(chart, _values(agents=[], controlPlane={"httpPort": 9000, "grpcPort": 9001}))
    svc = next(s for s in _of(custom, "Service"))
    assert [p["port"] for p in svc["spec"]["ports"]] == [9000, 9001]


@pytest.mark.parametrize("case", ["everything", "task-store-shared", "task-store-per-agent"])
def test_helm_lint_is_clean(case: str) -> None:
    report = helm_python.lint(CHART, MATRIX[case], strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [] and report["errors"] == []


# ---------------------------------------------------------------- refused values


def _with(path: str, value: Any, base: Obj | None = None) -> Obj:
    values = copy.deepcopy(base or MATRIX["one-agent"])
    *parents, leaf = path.split(".")
    node: Any = values
    for key in parents:
        node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
    if value is _DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return values


_DELETE = object()

BAD_VALUES = [
    ("etcd.endpoint", _DELETE, "at '/etcd': missing property 'endpoint'"),
    ("etcd.endpoint", "etcd:2379", "/etcd/endpoint"),
    ("vault.addr", _DELETE, "at '/vault': missing property 'addr'"),
    ("vault.addr", "", "/vault/addr"),
    ("agents.0.name", "9-lives", "/agents/0/name"),
    ("agents.0.name", "has space", "/agents/0/name"),
    ("agents.0.name", "trailing-", "/agents/0/name"),
    ("agents.0.name", "x" * 64, "/agents/0/name"),
    (
        "agents.0.autoscaling",
        {"enabled": True, "targetCPU": 101},
        "/agents/0/autoscaling/targetCPU",
    ),
    ("agents.0.autoscaling", {"enabled": True, "targetCPU": 0}, "/agents/0/autoscaling/targetCPU"),
    ("agents.0.tracks", {"canary": {"enabled": True, "weight": 10}}, "/agents/0/tracks/canary"),
    ("agents.0.tracks", {"stable": {"replicas": -1}}, "/agents/0/tracks/stable/replicas"),
    ("agents.0.tracks", {"canary": {"replicas": 0}}, "/agents/0/tracks/canary/replicas"),
    ("agents.0.colour", "blue", "/agents/0"),
    ("controlPlane.httpPort", 70000, "/controlPlane/httpPort"),
    ("istio.enabled", "yes", "/istio/enabled"),
    ("istio.routes", "istio", "/istio/routes"),
    ("jwt.issuers", [{"issuer": ""}], "/jwt/issuers/0/issuer"),
    ("jwt.issuers", [{"issuer": "a", "jwksUri": "ftp://k"}], "/jwt/issuers/0/jwksUri"),
    (
        "jwt.issuers",
        [{"issuer": "a", "jwksUri": "https://k", "jwks": {"keys": []}}],
        "/jwt/issuers/0",
    ),
    ("jwt.issuers", [{"issuer": "a", "audience": "x"}], "/jwt/issuers/0"),
    # an empty audience list would mean "any audience" to Istio: refused (omit it instead)
    (
        "jwt.issuers",
        [{"issuer": "a", "jwksUri": "https://k", "audiences": []}],
        "at '/jwt/issuers/0/audiences': minItems: got 0, want 1",
    ),
    ("jwt.controlPlaneAudiences", [], "at '/jwt/controlPlaneAudiences': minItems: got 0"),
    ("jwt.issuers", [{"issuer": "a"}], "at '/jwt/issuers/0': 'anyOf' failed"),
    ("jwt.issuers", [{"issuer": "a", "jwksUri": None}], "at '/jwt/issuers/0': 'anyOf' failed"),
    ("istio.trustDomain", "", "/istio/trustDomain"),
    ("otel.protocol", "udp", "/otel/protocol"),
    ("image.digest", "latest", "/image/digest"),
    ("taskStore.upstream", "http://redis:6379", "/taskStore/upstream"),
    ("taskStore.upstream", "redis://:secret@redis:6379/0", "/taskStore/upstream"),
    ("taskStore.upstream", "redis://redis:6379/tasks", "/taskStore/upstream"),
    ("taskStore.passwordRef", "secret/specmesh/infra/task-store", "/taskStore/passwordRef"),
    ("taskStore.passwordRef", "vault://secret/specmesh/infra/task-store", "/taskStore/passwordRef"),
    ("taskStore.retentionSeconds", 0, "/taskStore/retentionSeconds"),
    ("taskStore.user", "specmesh-tasks", "at '/taskStore': additional properties 'user'"),
    # a password needs an upstream; per-agent mode needs one too, without a user or password
    ("taskStore", {"passwordRef": "vault://secret/t#p"}, "/taskStore/upstream"),
    ("taskStore", {"perAgentUser": True}, "/taskStore/upstream"),
    (
        "taskStore",
        {"upstream": "redis://specmesh-tasks@redis:6379/0", "perAgentUser": True},
        "/taskStore/upstream",
    ),
    (
        "taskStore",
        {"upstream": "redis://redis:6379/0", "perAgentUser": True, "passwordRef": "vault://s/t#p"},
        "/taskStore/passwordRef",
    ),
]


@pytest.mark.parametrize(
    ("path", "value", "message"), BAD_VALUES, ids=[f"{p}={v!r:.20}" for p, v, _ in BAD_VALUES]
)
def test_bad_values_are_refused_naming_the_field(
    chart: helm_python.Chart, path: str, value: Any, message: str
) -> None:
    values = _with(path, value)
    with pytest.raises(helm_python.HelmValuesError) as schema_error:
        chart.validate_schema(values)
    assert message in str(schema_error.value)
    with pytest.raises(helm_python.HelmValuesError) as render_error:  # install/upgrade too
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert message in str(render_error.value)


def test_names_that_collide_are_refused(chart: helm_python.Chart) -> None:
    values = _values(agents=[{"name": "scheduleX-assistant"}, {"name": "schedulex_assistant"}])
    chart.validate_schema(values)  # each name alone is fine
    with pytest.raises(helm_python.HelmRenderError, match="both map to resource name"):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_a_shared_task_store_password_in_an_agents_tree_is_refused(
    chart: helm_python.Chart,
) -> None:
    # every agent's policy reads the shared password: in an agent's tree it would hand that
    # agent's secrets to all (the control plane's SPECMESH_TASK_STORE_PASSWORD refuses it too)
    values = _values(
        agents=[],
        taskStore={
            "upstream": "redis://redis:6379/0",
            "passwordRef": "vault://secret/specmesh/agents/mse-nacos-helper/task-store#password",
        },
    )
    chart.validate_schema(values)
    with pytest.raises(
        helm_python.HelmRenderError, match=r"taskStore\.passwordRef: .* agent's tree"
    ):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    with pytest.raises(ValueError, match="lies in an agent's own tree"):
        ControlPlaneSettings(task_store_password=values["taskStore"]["passwordRef"])


def test_autoscaling_min_above_max_is_refused(chart: helm_python.Chart) -> None:
    values = _values(agents=[{"name": "a", "autoscaling": {"enabled": True, "min": 5, "max": 2}}])
    with pytest.raises(helm_python.HelmRenderError, match=r"agents\[a\]\.autoscaling: min"):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


# ---------------------------------------------------------------- join with the control plane


def test_control_plane_mesh_objects_select_the_charts_pods(
    chart: helm_python.Chart, validator: IstioValidator
) -> None:
    agents = [{"name": n, "tracks": {"canary": {"enabled": True}}} for n in EXAMPLES]
    docs = _render(chart, _values(agents=agents))
    pods = [
        (d["spec"]["template"]["metadata"]["labels"], d["spec"]["template"]["spec"])
        for d in _of(docs, "Deployment")
        if d["metadata"]["name"] != "specmesh-control-plane"
    ]
    services = {s["metadata"]["name"]: s for s in _of(docs, "Service")}
    accounts = _names(docs, "ServiceAccount")
    settings = MeshSettings(namespace=NAMESPACE)
    canary = ReleaseSpec.model_validate(
        {"stableRevision": 1, "canaryRevision": 2, "canaryWeight": 10,
         "headerMatch": [{"name": "x-canary", "exact": "true"}]}
    )  # fmt: skip
    # mse-nacos-helper calls the two others (the seed's partner graph).
    callers = {"mse-gateway-assistant": ["mse-nacos-helper"], "scheduleX-assistant": [
        "mse-nacos-helper"], "mse-nacos-helper": []}  # fmt: skip
    for agent in EXAMPLES:
        objs = render_agent(agent, release=canary, callers=callers[agent], settings=settings)
        validator.check(objs)
        vs, dr, ap = objs
        # The VirtualService host is the chart's Service; each of its ports has routes, the
        # last one taking every call on that port, all to that same port.
        (host,) = vs["spec"]["hosts"]
        ports = {p["port"] for p in services[host]["spec"]["ports"]}
        by_port: dict[int, list[dict[str, Any]]] = {}
        for route in vs["spec"]["http"]:
            (port,) = {m["port"] for m in route["match"]}
            by_port.setdefault(port, []).append(route)
            for dest in route["route"]:
                assert dest["destination"]["host"] == host
                assert dest["destination"]["port"]["number"] == port
        assert set(by_port) == ports == {A2A_HTTP_PORT, A2A_GRPC_PORT}
        for port, routes in by_port.items():
            assert routes[-1]["match"] == [{"port": port}]
        # Every subset selects pods of this agent that the chart renders, and only those.
        service_selector = services[dr["spec"]["host"]]["spec"]["selector"]
        for subset in dr["spec"]["subsets"]:
            wanted = {**subset["labels"], **service_selector}
            matching = [labels for labels, _ in pods if wanted.items() <= labels.items()]
            assert matching, f"{agent}: subset {subset['name']} selects no pod of the chart"
            assert {m[LABEL_TRACK] for m in matching} == {subset["name"]}
            assert {m[LABEL_AGENT] for m in matching} == {resource_name(agent)}
        # The AuthorizationPolicy selects this agent's pods; its principals are the
        # ServiceAccounts the callers' pods run as.
        selector = ap["spec"]["selector"]["matchLabels"]
        selected = [spec for labels, spec in pods if selector.items() <= labels.items()]
        assert len(selected) == 2  # stable + canary
        principals = [p for r in ap["spec"]["rules"] for f in r.get("from", [])
                      for p in f["source"]["principals"]]  # fmt: skip
        assert len(principals) == len(callers[agent])
        for principal, caller in zip(principals, callers[agent], strict=True):
            trust, ns_kw, ns, sa_kw, sa = principal.split("/")
            assert (trust, ns_kw, ns, sa_kw) == ("cluster.local", "ns", NAMESPACE, "sa")
            assert sa in accounts
            caller_pods = [s for labels, s in pods if labels[LABEL_AGENT] == resource_name(caller)]
            assert caller_pods and {s["serviceAccountName"] for s in caller_pods} == {sa}


# ---------------------------------------------------------------- issue 14: cards, tokens, routes


def test_engine_cards_name_the_agent_service(chart: helm_python.Chart) -> None:
    """The card's URLs are the agent's Service DNS name and ports; Istio adds mTLS."""
    for case, istio in (("one-agent", True), ("canary-on", True), ("istio-off", False)):
        docs = _render(chart, MATRIX[case])
        services = {s["metadata"]["name"]: s for s in _of(docs, "Service")}
        for d in _of(docs, "Deployment"):
            if d["metadata"]["name"] == "specmesh-control-plane":
                continue
            engine = _env(_containers(d)["engine"])
            rn = d["metadata"]["labels"][LABEL_AGENT]
            http = urllib.parse.urlsplit(engine["SPECMESH_ENGINE_PUBLIC_HTTP_URL"])
            assert (http.scheme, http.hostname, http.port) == (
                "http", f"{rn}.{NAMESPACE}.svc.cluster.local", A2A_HTTP_PORT
            ), case  # fmt: skip
            host, _, port = engine["SPECMESH_ENGINE_PUBLIC_GRPC_URL"].rpartition(":")
            assert (host, int(port)) == (f"{rn}.{NAMESPACE}.svc.cluster.local", A2A_GRPC_PORT)
            svc = services[host.split(".")[0]]
            ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
            assert ports == {"http-a2a": http.port, "grpc-a2a": int(port)}
            if istio:
                assert engine["SPECMESH_CARD_SECURITY"] == "bearer,mtls", case
            else:
                assert "SPECMESH_CARD_SECURITY" not in engine, case  # the engine's default


def test_jwt_issuers_reach_the_sidecars_and_the_control_plane(chart: helm_python.Chart) -> None:
    docs = _render(chart, MATRIX["gateway-api"])
    cp = next(
        d for d in _of(docs, "Deployment") if d["metadata"]["name"] == "specmesh-control-plane"
    )
    cp_env = _env(_containers(cp)["control-plane"])
    assert cp_env["SPECMESH_TOKEN_ISSUER"] == "specmesh"
    text = cp_env["SPECMESH_JWT_ISSUERS"]
    own, idp = parse_jwt_issuers(text)
    # the control plane's own issuer: its JWKS on its own Service
    jwks = urllib.parse.urlsplit(own.jwks_uri or "")
    service = next(
        s for s in _of(docs, "Service") if s["metadata"]["name"] == "specmesh-control-plane"
    )
    assert jwks.hostname == f"specmesh-control-plane.{NAMESPACE}.svc.cluster.local"
    assert jwks.port in {p["port"] for p in service["spec"]["ports"] if p["name"] == "http-api"}
    assert jwks.path == "/.well-known/jwks.json"
    assert (own.issuer, own.audiences, own.jwks) == ("specmesh", ("{agent}",), None)
    assert idp == JwtIssuer(
        issuer="https://idp.example.com",
        jwks_uri="https://idp.example.com/.well-known/jwks.json",
        audiences=("{agent}", "agents"),
    )
    # the same list on every sidecar, and the control plane's settings read it
    for d in _of(docs, "Deployment"):
        if d["metadata"]["name"] != "specmesh-control-plane":
            assert _env(_containers(d)["sidecar"])["SPECMESH_JWT_ISSUERS"] == text
    settings = ControlPlaneSettings(
        jwt_issuers=text, mesh_routes=cp_env["SPECMESH_MESH_ROUTES"]
    ).mesh()
    assert settings.jwt_issuers == (own, idp) and settings.routes == "gateway-api"
    # the agents may reach that JWKS: their NetworkPolicy lets them call the control plane
    cp_pods = cp["spec"]["template"]["metadata"]["labels"]
    for policy in _of(docs, "NetworkPolicy"):
        assert any(
            {p["port"] for p in rule["ports"]} == {jwks.port}
            and any(t["podSelector"]["matchLabels"].items() <= cp_pods.items()
                    for t in rule.get("to", []) if "podSelector" in t)
            for rule in policy["spec"]["egress"]
        ), policy["metadata"]["name"]  # fmt: skip
    # defaults: the control plane's issuer alone
    one = _render(chart, MATRIX["one-agent"])
    helper = next(d for d in _of(one, "Deployment") if d["metadata"]["name"].startswith("mse-"))
    sidecar = _env(_containers(helper)["sidecar"])
    assert [i.issuer for i in parse_jwt_issuers(sidecar["SPECMESH_JWT_ISSUERS"])] == ["specmesh"]


def test_an_issuer_without_audiences_gets_the_default_one(chart: helm_python.Chart) -> None:
    values = _with("jwt.issuers", [{"issuer": "https://idp", "jwks": {"keys": []}}])
    docs = _render(chart, values)
    sidecar = _env(
        _containers(
            next(d for d in _of(docs, "Deployment") if d["metadata"]["name"].startswith("mse-"))
        )["sidecar"]
    )
    entries = json.loads(sidecar["SPECMESH_JWT_ISSUERS"])
    assert "audiences" not in entries[1]  # so the one default applies, never []
    own, idp = parse_jwt_issuers(sidecar["SPECMESH_JWT_ISSUERS"])
    assert own.audiences == idp.audiences == ("{agent}",)


@pytest.mark.parametrize(
    ("issuers", "message"),
    [
        ([{"issuer": "specmesh", "jwksUri": "https://k"}], 'issuer "specmesh" is listed twice'),
        (
            [{"issuer": "https://idp", "jwksUri": "https://k"},
             {"issuer": "https://idp/tenant", "jwksUri": "https://k"}],
            'issuers "https://idp" and "https://idp/tenant" overlap',
        ),
        ([{"issuer": "specmesh/x", "jwksUri": "https://k"}], 'issuers "specmesh" and "specmesh/x"'),
    ],
)  # fmt: skip
def test_issuers_the_sidecars_would_refuse_fail_the_install(
    chart: helm_python.Chart, issuers: list[dict[str, Any]], message: str
) -> None:
    values = _with("jwt.issuers", issuers)
    chart.validate_schema(values)  # each entry alone is fine
    with pytest.raises(helm_python.HelmRenderError, match=re.escape(message)):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    with pytest.raises(ValueError, match=r"listed twice|overlap"):  # as the processes would
        parse_jwt_issuers([{"issuer": "specmesh", "jwksUri": "https://k"}, *issuers])


def test_sidecars_check_istio_callers_against_the_namespace_and_trust_domain(
    chart: helm_python.Chart,
) -> None:
    docs = _render(chart, _with("istio.trustDomain", "example.org"))
    cp = next(
        d for d in _of(docs, "Deployment") if d["metadata"]["name"] == "specmesh-control-plane"
    )
    assert _env(_containers(cp)["control-plane"])["SPECMESH_MESH_TRUST_DOMAIN"] == "example.org"
    for d in _of(docs, "Deployment"):
        if d["metadata"]["name"] == "specmesh-control-plane":
            continue
        env = {e["name"]: e for e in _containers(d)["sidecar"]["env"]}
        assert env["SPECMESH_ISTIO_TRUST_DOMAIN"]["value"] == "example.org"
        assert env["POD_NAMESPACE"]["valueFrom"] == {
            "fieldRef": {"fieldPath": "metadata.namespace"}
        }
    default = _render(chart, MATRIX["one-agent"])
    helper = next(d for d in _of(default, "Deployment") if d["metadata"]["name"].startswith("mse-"))
    assert _env(_containers(helper)["sidecar"])["SPECMESH_ISTIO_TRUST_DOMAIN"] == "cluster.local"


def test_gateway_api_routes_send_to_the_charts_track_services(
    chart: helm_python.Chart, validator: IstioValidator
) -> None:
    docs = _render(chart, MATRIX["gateway-api"])
    assert _problems(validator, docs) == []
    services = {s["metadata"]["name"]: s for s in _of(docs, "Service")}
    pods = [d["spec"]["template"]["metadata"]["labels"] for d in _of(docs, "Deployment")
            if d["metadata"]["name"] != "specmesh-control-plane"]  # fmt: skip
    cp = next(
        d for d in _of(docs, "Deployment") if d["metadata"]["name"] == "specmesh-control-plane"
    )
    cp_env = _env(_containers(cp)["control-plane"])
    settings = ControlPlaneSettings(
        mesh_namespace=NAMESPACE,
        mesh_routes=cp_env["SPECMESH_MESH_ROUTES"],
        jwt_issuers=cp_env["SPECMESH_JWT_ISSUERS"],
    ).mesh()
    canary = ReleaseSpec.model_validate(
        {"stableRevision": 1, "canaryRevision": 2, "canaryWeight": 10,
         "headerMatch": [{"name": "x-canary", "exact": "true"}]}
    )  # fmt: skip
    objs = render_mesh({a: canary for a in EXAMPLES}, {}, settings=settings)
    validator.check(objs)
    routes = [o for o in objs if o["kind"] in ("HTTPRoute", "GRPCRoute")]
    assert len(routes) == 2 * len(EXAMPLES)
    for route in routes:
        (parent,) = route["spec"]["parentRefs"]
        parent_ports = {p["port"]: p["name"] for p in services[parent["name"]]["spec"]["ports"]}
        assert parent["port"] in parent_ports
        for rule in route["spec"]["rules"]:
            for ref in rule["backendRefs"]:
                svc = services[ref["name"]]  # a Service the chart renders ...
                ports = {p["port"]: p["name"] for p in svc["spec"]["ports"]}
                # ... with the same port, of the same name, as the route's parent
                assert ports[ref["port"]] == parent_ports[parent["port"]]
                selector = svc["spec"]["selector"]
                selected = [labels for labels in pods if selector.items() <= labels.items()]
                assert selected, ref["name"]
                assert {s[LABEL_TRACK] for s in selected} == {ref["name"].rsplit("-", 1)[1]}
    # the control plane may publish them; the VirtualService mode renders no track Service
    role = next(r for r in _of(docs, "Role") if r["metadata"]["name"] == "specmesh-control-plane")
    granted = {
        (g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
    }
    assert {
        ("gateway.networking.k8s.io", "httproutes"),
        ("gateway.networking.k8s.io", "grpcroutes"),
        ("security.istio.io", "requestauthentications"),
    } <= granted
    plain = _render(chart, MATRIX["canary-on"])
    assert _names(plain, "Service") == {"schedulex-assistant", "specmesh-control-plane"}


# ---------------------------------------------------------------- the A2A task store


def _settings_from(container: Obj, model: type[BaseSettings], monkeypatch: pytest.MonkeyPatch,
                   **extra: str) -> Any:  # fmt: skip
    """The container's settings as its process reads them: every literal variable the chart
    sets (not the downward API's nor $(VAR) substitutions), through the real settings."""
    with monkeypatch.context() as m:
        for name in [n for n in os.environ if n.startswith(("SPECMESH_", "AGENT_NAME"))]:
            m.delenv(name)
        for name, value in {**_env(container), **extra}.items():
            if value != "<valueFrom>" and "$(" not in value:
                m.setenv(name, value)
        return model()


def _agent_deployments(docs: list[Obj]) -> list[Obj]:
    return [d for d in _of(docs, "Deployment") if LABEL_AGENT in d["metadata"]["labels"]]


def _control_plane_env(docs: list[Obj]) -> dict[str, str]:
    (cp,) = [
        d for d in _of(docs, "Deployment") if d["metadata"]["name"] == "specmesh-control-plane"
    ]
    return _env(_containers(cp)["control-plane"])


def test_without_a_task_store_the_engines_keep_tasks_in_memory(chart: helm_python.Chart) -> None:
    docs = _render(chart, MATRIX["canary-on"])
    for d in _of(docs, "Deployment"):
        for c in d["spec"]["template"]["spec"]["containers"]:
            assert not [n for n in _env(c) if n.startswith("SPECMESH_TASK_")], c["name"]
    for policy in _of(docs, "NetworkPolicy"):
        ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
        assert 6379 not in ports


def test_a_shared_task_store_reaches_every_engine_through_its_sidecar(
    chart: helm_python.Chart, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    values = MATRIX["task-store-shared"]
    docs = _render(chart, values)
    password = values["taskStore"]["passwordRef"]
    deployments = _agent_deployments(docs)
    assert len(deployments) == 2 * len(EXAMPLES)
    for d in deployments:
        containers = _containers(d)
        sidecar = _settings_from(
            containers["sidecar"], SidecarSettings, monkeypatch, SPECMESH_HOME=str(tmp_path)
        )
        engine = _settings_from(containers["engine"], ServeSettings, monkeypatch)
        # the engine: no password, the sidecar's loopback proxy, the install's retention
        assert engine.task_store == f"redis://{sidecar.task_store_proxy}/0"
        assert sidecar.task_store_proxy.startswith("127.0.0.1:")
        assert engine.task_retention_seconds == 3600
        assert "SPECMESH_TASK_STORE_PASSWORD" not in _env(containers["engine"])
        # the sidecar: the one shared user and password, the same for every agent
        assert sidecar.task_store_upstream == values["taskStore"]["upstream"]
        assert sidecar.task_store_password == password
    # the control plane lets every agent's policy read exactly that password
    cp = _settings_from(
        {"env": [{"name": "SPECMESH_TASK_STORE_PASSWORD",
                  "value": _control_plane_env(docs)["SPECMESH_TASK_STORE_PASSWORD"]}]},
        ControlPlaneSettings, monkeypatch,
    )  # fmt: skip
    ref = VaultRef.parse(cp.task_store_password)
    assert ref == VaultRef.parse(password)
    policy = agent_policy("mse-nacos-helper", mount="secret", infrastructure=(ref.mount, ref.path))
    assert 'path "secret/data/specmesh/infra/task-store"' in policy
    # the agents may reach the Redis: on the upstream's port, to the peers the values name
    for policy_obj in _of(docs, "NetworkPolicy"):
        rules = [
            r for r in policy_obj["spec"]["egress"] if {p["port"] for p in r["ports"]} == {6380}
        ]
        assert rules == [
            {
                "ports": [{"port": 6380, "protocol": "TCP"}],
                "to": values["networkPolicy"]["egress"]["taskStore"]["to"],
            }
        ], policy_obj["metadata"]["name"]


def test_a_per_agent_task_store_user_confines_each_agent_to_its_own_tree(
    chart: helm_python.Chart, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    values = MATRIX["task-store-per-agent"]
    docs = _render(chart, values)
    seen = set()
    for d in _agent_deployments(docs):
        containers = _containers(d)
        sidecar = _settings_from(
            containers["sidecar"], SidecarSettings, monkeypatch, SPECMESH_HOME=str(tmp_path)
        )
        engine = _settings_from(containers["engine"], ServeSettings, monkeypatch)
        rn = resource_name(sidecar.agent_name)
        seen.add(rn)
        assert engine.task_store == f"redis://{sidecar.task_store_proxy}/0"
        assert engine.task_retention_seconds == 86400  # the chart's default
        # the agent's own Redis ACL user (docs/security.md: tasks-<rn>, ~specmesh:a2a:<rn>:*)
        upstream = urllib.parse.urlsplit(sidecar.task_store_upstream or "")
        assert (upstream.scheme, upstream.username, upstream.hostname, upstream.port) == (
            "rediss", f"tasks-{rn}", "redis.redis.svc.cluster.local", None
        )  # fmt: skip
        assert upstream.path == "/0"
        # its password in its own tree, which its policy (and only its) reads
        ref = VaultRef.parse(sidecar.task_store_password or "")
        assert (ref.mount, ref.path, ref.field) == (
            "kv", f"{agent_secret_prefix(sidecar.agent_name)}/task-store", "password"
        )  # fmt: skip
        policy = agent_policy(sidecar.agent_name, mount="kv")
        assert f'path "kv/data/{agent_secret_prefix(sidecar.agent_name)}/*"' in policy
    assert seen == {resource_name(n) for n in [*EXAMPLES, "billing_bot.v2"]}
    # no shared password: no agent's policy reads anything outside its tree
    assert "SPECMESH_TASK_STORE_PASSWORD" not in _control_plane_env(docs)
    for policy_obj in _of(docs, "NetworkPolicy"):
        assert any(
            r["ports"] == [{"port": 6379, "protocol": "TCP"}] and "to" not in r
            for r in policy_obj["spec"]["egress"]
        ), policy_obj["metadata"]["name"]


def test_the_task_store_retention_default_is_the_engines(chart: helm_python.Chart) -> None:
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert defaults["taskStore"]["retentionSeconds"] == DEFAULT_RETENTION_SECONDS
    assert defaults["taskStore"]["upstream"] == ""  # off unless the install names a Redis
