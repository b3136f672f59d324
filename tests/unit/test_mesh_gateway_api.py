"""The Gateway API option (ambient mode): HTTPRoute and GRPCRoute per agent, validated
against the vendored Gateway API CRD schemas."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from control_plane.gatewayapi import CRDS_PATH as GATEWAY_API_CRDS
from control_plane.istio import CRDS_PATH
from control_plane.mesh import (
    IstioValidator,
    MeshObjectError,
    MeshSettings,
    render_mesh,
    track_service_name,
)
from specmesh.issuers import JwtIssuer
from specmesh.k8s import A2A_GRPC_PORT, A2A_HTTP_PORT
from specmesh.spec.models import ReleaseSpec

Obj = dict[str, Any]
SETTINGS = MeshSettings(namespace="agents", routes="gateway-api")
CANARY = ReleaseSpec.model_validate(
    {
        "stableRevision": 1,
        "canaryRevision": 2,
        "canaryWeight": 10,
        "timeoutSeconds": 30,
        "headerMatch": [
            {"name": "X-Canary", "exact": "true"},
            {"name": "X-Tenant", "prefix": "a."},
        ],
    }
)


@pytest.fixture(scope="module")
def validator() -> IstioValidator:
    return IstioValidator(CRDS_PATH)


def _objects(release: ReleaseSpec | None = CANARY) -> list[Obj]:
    return render_mesh(
        {"scheduleX-assistant": release, "mse-nacos-helper": None},
        {"mse-nacos-helper": ["scheduleX-assistant"]},
        settings=SETTINGS,
    )


def _find(objs: list[Obj], kind: str, name: str) -> Obj:
    return next(o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name)


def test_every_gateway_api_object_validates(validator: IstioValidator) -> None:
    objs = _objects()
    validator.check(objs)
    kinds = sorted(o["kind"] for o in objs if o["metadata"]["name"].startswith("schedulex"))
    assert kinds == [
        "AuthorizationPolicy", "DestinationRule", "DestinationRule", "GRPCRoute", "HTTPRoute",
    ]  # fmt: skip
    assert not [o for o in objs if o["kind"] == "VirtualService"]


def test_the_default_is_the_virtual_service() -> None:
    objs = render_mesh({"a": None}, {}, settings=MeshSettings())
    assert {o["kind"] for o in objs} >= {"VirtualService", "DestinationRule"}
    assert not [o for o in objs if o["kind"] in ("HTTPRoute", "GRPCRoute")]


def test_each_service_port_is_routed_to_the_same_port(validator: IstioValidator) -> None:
    """The route attached to Service port 8080 sends to 8080, the one on 8081 to 8081."""
    objs = _objects()
    validator.check(objs)
    by_parent_port: dict[int, Obj] = {}
    for route in (o for o in objs if o["kind"] in ("HTTPRoute", "GRPCRoute")):
        if route["metadata"]["name"] != "schedulex-assistant":
            continue
        (parent,) = route["spec"]["parentRefs"]
        assert (parent["group"], parent["kind"], parent["name"]) == (
            "", "Service", "schedulex-assistant"
        )  # fmt: skip
        by_parent_port[parent["port"]] = route
        ports = {b["port"] for r in route["spec"]["rules"] for b in r["backendRefs"]}
        assert ports == {parent["port"]}
    assert by_parent_port[A2A_HTTP_PORT]["kind"] == "HTTPRoute"
    assert by_parent_port[A2A_GRPC_PORT]["kind"] == "GRPCRoute"


def test_weights_and_canary_header_on_both_ports(validator: IstioValidator) -> None:
    objs = _objects()
    validator.check(objs)
    stable = track_service_name("scheduleX-assistant", "stable")
    canary = track_service_name("scheduleX-assistant", "canary")
    assert (stable, canary) == ("schedulex-assistant-stable", "schedulex-assistant-canary")
    headers = [
        {"type": "Exact", "name": "X-Canary", "value": "true"},
        {"type": "RegularExpression", "name": "X-Tenant", "value": r"^a\..*"},
    ]
    for kind, port in (("HTTPRoute", A2A_HTTP_PORT), ("GRPCRoute", A2A_GRPC_PORT)):
        rules = _find(objs, kind, "schedulex-assistant")["spec"]["rules"]
        last = rules[-1]
        assert [(b["name"], b["weight"]) for b in last["backendRefs"]] == [
            (stable, 90),
            (canary, 10),
        ]
        by_header = [r for r in rules if any("headers" in m for m in r.get("matches", []))]
        assert by_header, kind
        for rule in by_header:
            assert rule["backendRefs"] == [{"name": canary, "port": port}]
            assert all(m["headers"] == headers for m in rule["matches"])


def test_http_reads_get_the_timeout_and_a_canary_read_stays_canary(
    validator: IstioValidator,
) -> None:
    """Gateway API ranks a method match above header matches, so the canary header route
    repeats the read methods: a GET with the header goes to the canary."""
    objs = _objects()
    validator.check(objs)
    rules = {r["name"]: r for r in _find(objs, "HTTPRoute", "schedulex-assistant")["spec"]["rules"]}
    assert list(rules) == [
        "http-a2a-read-canary-by-header", "http-a2a-canary-by-header", "http-a2a-read", "http-a2a",
    ]  # fmt: skip
    assert rules["http-a2a-read"]["timeouts"] == {"request": "30s"}
    assert {m["method"] for m in rules["http-a2a-read-canary-by-header"]["matches"]} == {
        "GET", "HEAD"
    }  # fmt: skip
    # calls that may stream (JSON-RPC POST /, REST :stream) have no route timeout
    assert (
        "timeouts" not in rules["http-a2a"] and "timeouts" not in rules["http-a2a-canary-by-header"]
    )


def test_without_canary_everything_goes_to_stable(validator: IstioValidator) -> None:
    objs = _objects(release=None)
    validator.check(objs)
    for kind in ("HTTPRoute", "GRPCRoute"):
        rules = _find(objs, kind, "schedulex-assistant")["spec"]["rules"]
        backends = {(b["name"], b.get("weight")) for r in rules for b in r["backendRefs"]}
        assert backends == {("schedulex-assistant-stable", 100)}


def test_a_destination_rule_per_track_service(validator: IstioValidator) -> None:
    objs = _objects()
    validator.check(objs)
    mine = [
        o for o in objs if o["metadata"]["labels"].get("specmesh.io/agent") == "schedulex-assistant"
    ]
    hosts = sorted(o["spec"]["host"] for o in mine if o["kind"] == "DestinationRule")
    assert hosts == ["schedulex-assistant-canary", "schedulex-assistant-stable"]
    dr = _find(objs, "DestinationRule", "schedulex-assistant-stable")
    assert "subsets" not in dr["spec"]
    assert dr["spec"]["trafficPolicy"]["outlierDetection"]["consecutive5xxErrors"] == 5


@pytest.mark.parametrize(
    ("kind", "path", "value", "problem"),
    [
        ("HTTPRoute", ["rules", 3, "backendRefs", 0, "port"], None,
         "rules[3].backendRefs[0]: Must have port for Service reference"),
        ("HTTPRoute", ["rules", 2, "timeouts", "request"], "30 seconds",
         "spec.rules.2.timeouts.request: '30 seconds' does not match"),
        ("HTTPRoute", ["rules", 2, "timeouts", "backendRequest"], "1m",
         "rules[2].timeouts: backendRequest timeout cannot be longer than request timeout"),
        ("HTTPRoute", ["rules", 3, "matches", 0, "path", "value"], "/a//b",
         "rules[3].matches[0].path: must not contain '//' when type one of"),
        ("HTTPRoute", ["rules", 3, "filters"], [{"type": "RequestMirror"}],
         "spec.rules.3: Additional properties are not allowed ('filters' was unexpected)"),
        ("GRPCRoute", ["rules", 0, "matches", 0, "method"], {"type": "Exact", "service": "a b"},
         "rules[0].matches[0].method: service must only contain valid characters"),
        ("GRPCRoute", ["parentRefs", 0, "port"], 70000,
         "spec.parentRefs.0.port: 70000 is greater than the maximum of 65535"),
    ],
)  # fmt: skip
def test_the_validator_refuses_what_the_api_server_refuses(
    validator: IstioValidator, kind: str, path: list[Any], value: Any, problem: str
) -> None:
    route = copy.deepcopy(_find(_objects(), kind, "schedulex-assistant"))
    *parents, last = path
    node = route["spec"]
    for key in parents:
        node = node[key]
    if value is None:
        del node[last]
    else:
        node[last] = value
    with pytest.raises(MeshObjectError) as e:
        validator.check([route])
    assert any(problem in p for p in e.value.problems), e.value.problems


def test_the_vendored_file_names_its_version() -> None:
    text = GATEWAY_API_CRDS.read_text()
    assert "gateway.networking.k8s.io/bundle-version: v1.3.0" in text
    assert "gateway.networking.k8s.io/channel: standard" in text
    readme = (GATEWAY_API_CRDS.parent / "README.md").read_text()
    assert "v1.3.0" in readme and "08ea367de48b52fac72b4669c82756a01a077c4a" in readme


def test_security_policies_target_the_services_in_ambient_mode(validator: IstioValidator) -> None:
    """In ambient mode the waypoint enforces L7 policy: the policies name the agent's
    Services (targetRefs), not its pods (a selector is for sidecars and ztunnel)."""
    settings = MeshSettings(
        namespace="agents",
        routes="gateway-api",
        jwt_issuers=(JwtIssuer(issuer="specmesh", jwks_uri="http://cp:8090/jwks"),),
    )
    objs = render_mesh({"scheduleX-assistant": None}, {}, settings=settings)
    validator.check(objs)
    services = ["schedulex-assistant", "schedulex-assistant-stable", "schedulex-assistant-canary"]
    for kind in ("AuthorizationPolicy", "RequestAuthentication"):
        spec = _find(objs, kind, "schedulex-assistant")["spec"]
        assert "selector" not in spec
        assert spec["targetRefs"] == [{"group": "", "kind": "Service", "name": n} for n in services]
    sidecar_mode = render_mesh({"scheduleX-assistant": None}, {}, settings=MeshSettings())
    ap = _find(sidecar_mode, "AuthorizationPolicy", "schedulex-assistant")
    assert ap["spec"]["selector"] == {"matchLabels": {"specmesh.io/agent": "schedulex-assistant"}}
