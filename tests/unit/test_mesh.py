"""The mesh publisher's Istio objects, validated against the Istio CRD schemas."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from control_plane.istio import CRDS_PATH
from control_plane.mesh import (
    IstioValidator,
    MeshObjectError,
    MeshSettings,
    render_mesh,
    write_yaml,
)
from specmesh.k8s import LABEL_TRACK
from specmesh.spec.models import ReleaseSpec


@pytest.fixture(scope="module")
def validator() -> IstioValidator:
    return IstioValidator(CRDS_PATH)


def _objects() -> list[dict[str, Any]]:
    canary = ReleaseSpec.model_validate(
        {
            "stableRevision": 1,
            "canaryRevision": 2,
            "canaryWeight": 10,
            "headerMatch": [{"name": "X-Canary", "exact": "true"}],
            "outlierDetection": {"consecutive5xxErrors": 3, "consecutiveGatewayErrors": 2},
        }
    )
    return render_mesh(
        {"mse-nacos-helper": None, "scheduleX-assistant": canary, "mse-gateway-assistant": None},
        {"mse-nacos-helper": ["mse-gateway-assistant", "scheduleX-assistant"]},
        settings=MeshSettings(namespace="agents"),
    )


def _find(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name)


def test_every_rendered_object_validates(validator: IstioValidator) -> None:
    objs = _objects()
    validator.check(objs)
    kinds = sorted({o["kind"] for o in objs})
    assert kinds == [
        "AuthorizationPolicy", "DestinationRule", "PeerAuthentication", "VirtualService",
    ]  # fmt: skip
    assert len(objs) == 1 + 3 * 3


def test_canary_split_header_match_and_subsets(validator: IstioValidator) -> None:
    objs = _objects()
    vs = _find(objs, "VirtualService", "schedulex-assistant")
    header_route, split = vs["spec"]["http"]
    assert header_route["match"] == [{"headers": {"x-canary": {"exact": "true"}}}]
    assert [d["destination"]["subset"] for d in header_route["route"]] == ["canary"]
    assert [(d["destination"]["subset"], d["weight"]) for d in split["route"]] == [
        ("stable", 90),
        ("canary", 10),
    ]
    dr = _find(objs, "DestinationRule", "schedulex-assistant")
    assert dr["spec"]["subsets"] == [
        {"name": "stable", "labels": {LABEL_TRACK: "stable"}},
        {"name": "canary", "labels": {LABEL_TRACK: "canary"}},
    ]
    outlier = dr["spec"]["trafficPolicy"]["outlierDetection"]
    assert (outlier["consecutive5xxErrors"], outlier["consecutiveGatewayErrors"]) == (3, 2)


def test_authorization_allows_only_agents_listing_it_as_partner() -> None:
    objs = _objects()
    gateway = _find(objs, "AuthorizationPolicy", "mse-gateway-assistant")
    assert gateway["spec"]["rules"] == [
        {"from": [{"source": {"principals": [
            "cluster.local/ns/agents/sa/specmesh-agent-mse-nacos-helper"
        ]}}]}
    ]  # fmt: skip
    helper = _find(objs, "AuthorizationPolicy", "mse-nacos-helper")
    assert "rules" not in helper["spec"]  # nobody lists it: ALLOW with no rule allows nothing


BAD: list[tuple[str, str, str, Any, str]] = [
    (
        "weights not summing to 100",
        "VirtualService", "spec.http.1.route.0.weight", 50,
        "VirtualService/schedulex-assistant: spec.http[1].route: weights must sum to 100 (got 60)",
    ),
    (
        "missing host",
        "VirtualService", "spec.hosts", [],
        "VirtualService/schedulex-assistant: spec.hosts: at least one host is required",
    ),
    (
        "unknown field",
        "VirtualService", "spec.bogus", 1,
        "VirtualService/schedulex-assistant: spec: Additional properties are not allowed "
        "('bogus' was unexpected)",
    ),
    (
        "wrong type",
        "DestinationRule", "spec.trafficPolicy.outlierDetection.interval", 5,
        "DestinationRule/schedulex-assistant: spec.trafficPolicy.outlierDetection.interval: "
        "5 is not of type 'string'",
    ),
    (
        "CEL rule: duration too small",
        "DestinationRule", "spec.trafficPolicy.outlierDetection.baseEjectionTime", "0s",
        "DestinationRule/schedulex-assistant: spec.trafficPolicy.outlierDetection."
        "baseEjectionTime: must be a valid duration greater than 1ms",
    ),
    (
        "undefined subset",
        "DestinationRule", "spec.subsets", [{"name": "stable", "labels": {LABEL_TRACK: "stable"}}],
        "VirtualService/schedulex-assistant: spec.http[0].route[0].destination.subset: subset "
        "'canary' is not defined by a DestinationRule for host 'schedulex-assistant'",
    ),
    (
        "bad enum",
        "AuthorizationPolicy", "spec.action", "PERMIT",
        "AuthorizationPolicy/schedulex-assistant: spec.action: 'PERMIT' is not one of "
        "['ALLOW', 'DENY', 'AUDIT', 'CUSTOM']",
    ),
]  # fmt: skip


def _set(obj: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node: Any = obj
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    if last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value


@pytest.mark.parametrize(("kind", "path", "value", "message"), [b[1:] for b in BAD],
                         ids=[b[0] for b in BAD])  # fmt: skip
def test_bad_objects_are_caught_before_publishing(
    validator: IstioValidator, kind: str, path: str, value: Any, message: str
) -> None:
    objs = copy.deepcopy(_objects())
    _set(_find(objs, kind, "schedulex-assistant"), path, value)

    with pytest.raises(MeshObjectError) as info:
        validator.check(objs)

    assert message in info.value.problems, info.value.problems


def test_write_yaml_removes_objects_of_deleted_agents(tmp_path: Path) -> None:
    objs = _objects()
    write_yaml(objs, tmp_path)
    assert len(list(tmp_path.glob("*.yaml"))) == 10
    (tmp_path / "unrelated.yaml").write_text("kind: ConfigMap\n")

    remaining = [o for o in objs if o["metadata"].get("labels", {}).get("specmesh.io/agent")
                 != "mse-gateway-assistant"]  # fmt: skip
    write_yaml(remaining, tmp_path)

    names = sorted(p.name for p in tmp_path.glob("*.yaml"))
    assert "virtualservice-mse-gateway-assistant.yaml" not in names
    assert "unrelated.yaml" in names and len(names) == 8
