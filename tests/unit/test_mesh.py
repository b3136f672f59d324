"""The mesh publisher's Istio objects, validated against the Istio CRD schemas."""

from __future__ import annotations

import copy
import re
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
from specmesh.k8s import A2A_GRPC_PORT, A2A_HTTP_PORT, LABEL_TRACK
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


def _routes_by_port(vs: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    """The VirtualService's HTTP routes, by the Service port each one matches."""
    out: dict[int, list[dict[str, Any]]] = {}
    for route in vs["spec"]["http"]:
        (port,) = {m["port"] for m in route["match"]}  # every condition names one port
        out.setdefault(port, []).append(route)
    return out


def _split(routes: list[dict[str, Any]]) -> list[tuple[str, int, int]]:
    """(subset, port, weight) of the port's last route: the one every other call takes."""
    last = routes[-1]
    assert last["match"] == [{"port": last["route"][0]["destination"]["port"]["number"]}]
    return [(d["destination"]["subset"], d["destination"]["port"]["number"], d.get("weight", 0))
            for d in last["route"]]  # fmt: skip


def test_each_service_port_is_routed_to_the_same_port(validator: IstioValidator) -> None:
    objs = _objects()
    validator.check(objs)

    for name in ("mse-nacos-helper", "schedulex-assistant"):  # without and with a release
        by_port = _routes_by_port(_find(objs, "VirtualService", name))
        assert sorted(by_port) == [A2A_HTTP_PORT, A2A_GRPC_PORT]
        for port, routes in by_port.items():
            for route in routes:
                assert {d["destination"]["port"]["number"] for d in route["route"]} == {port}
    helper = _routes_by_port(_find(objs, "VirtualService", "mse-nacos-helper"))
    assert _split(helper[A2A_HTTP_PORT]) == [("stable", 8080, 100)]
    assert _split(helper[A2A_GRPC_PORT]) == [("stable", 8081, 100)]


def test_canary_header_match_and_weights_apply_on_both_ports(validator: IstioValidator) -> None:
    objs = _objects()
    vs = _find(objs, "VirtualService", "schedulex-assistant")

    by_port = _routes_by_port(vs)
    for port in (A2A_HTTP_PORT, A2A_GRPC_PORT):
        routes = by_port[port]
        assert _split(routes) == [("stable", port, 90), ("canary", port, 10)]
        by_header = [r for r in routes if r["name"].endswith("-canary-by-header")]
        split = [r for r in routes if not r["name"].endswith("-canary-by-header")]
        assert len(by_header) == len(split) == 3  # stream, read, call
        for header_route, split_route in zip(by_header, split, strict=True):
            # The header route comes first and narrows the same calls to the canary.
            assert routes.index(header_route) < routes.index(split_route)
            assert header_route["match"] == [
                {**m, "headers": {"x-canary": {"exact": "true"}}} for m in split_route["match"]
            ]
            assert [d["destination"]["subset"] for d in header_route["route"]] == ["canary"]
            assert [d["weight"] for d in split_route["route"]] == [90, 10]
    dr = _find(objs, "DestinationRule", "schedulex-assistant")
    assert dr["spec"]["subsets"] == [
        {"name": "stable", "labels": {LABEL_TRACK: "stable"}},
        {"name": "canary", "labels": {LABEL_TRACK: "canary"}},
    ]
    outlier = dr["spec"]["trafficPolicy"]["outlierDetection"]
    assert (outlier["consecutive5xxErrors"], outlier["consecutiveGatewayErrors"]) == (3, 2)


def _route(objs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    vs = _find(objs, "VirtualService", "mse-nacos-helper")
    return next(r for r in vs["spec"]["http"] if r["name"] == name)


NOT_SENT = "connect-failure,refused-stream,reset-before-request"


def test_only_idempotent_calls_are_retried_after_the_agent_got_them() -> None:
    objs = _objects()  # the default release: connect-failure,gateway-error,reset

    retry_on = {r: _route(objs, r)["retries"]["retryOn"] for r in (
        "http-a2a-stream", "http-a2a-read", "http-a2a-call",
        "grpc-a2a-stream", "grpc-a2a-read", "grpc-a2a-call",
    )}  # fmt: skip

    assert retry_on == {
        "http-a2a-stream": NOT_SENT,
        "http-a2a-read": "connect-failure,gateway-error,reset",
        "http-a2a-call": NOT_SENT,  # JSON-RPC POST /: SendMessage among others
        "grpc-a2a-stream": NOT_SENT,
        "grpc-a2a-read": "connect-failure,gateway-error,reset,unavailable",
        "grpc-a2a-call": NOT_SENT,  # SendMessage, CancelTask
    }
    for name in ("http-a2a-read", "grpc-a2a-call"):
        assert _route(objs, name)["retries"]["attempts"] == 2
        assert _route(objs, name)["retries"]["perTryTimeout"] == "30s"


def test_a_release_retrying_only_after_sending_retries_no_call(validator: IstioValidator) -> None:
    release = ReleaseSpec.model_validate({"retries": {"retryOn": "retriable-4xx,unavailable"}})
    objs = render_mesh({"mse-nacos-helper": release}, {}, settings=MeshSettings())
    validator.check(objs)

    # Not omitted: with no `retries` Istio would apply its default policy (503, unavailable).
    assert _route(objs, "grpc-a2a-call")["retries"] == {"attempts": 0}
    assert _route(objs, "http-a2a-stream")["retries"] == {"attempts": 0}
    assert _route(objs, "grpc-a2a-read")["retries"]["retryOn"] == "retriable-4xx,unavailable"


def test_streams_have_no_route_timeout() -> None:
    objs = _objects()

    timeouts = {r["name"]: r.get("timeout") for r in
                _find(objs, "VirtualService", "mse-nacos-helper")["spec"]["http"]}  # fmt: skip

    # Envoy's route timeout runs to the end of the response: it would cut a stream. JSON-RPC
    # streams share `POST /` with the other methods, so that route has none either.
    assert timeouts == {
        "http-a2a-stream": None,
        "http-a2a-read": "300s",
        "http-a2a-call": None,
        "grpc-a2a-stream": None,
        "grpc-a2a-read": "300s",
        "grpc-a2a-call": "300s",
    }


def test_grpc_routes_tell_methods_apart_for_both_protocol_versions() -> None:
    objs = _objects()
    stream, read = (
        re.compile(_route(objs, n)["match"][0]["uri"]["regex"])
        for n in ("grpc-a2a-stream", "grpc-a2a-read")
    )
    for package in ("lf.a2a.v1", "a2a.v1"):
        prefix = f"/{package}.A2AService/"
        assert stream.fullmatch(prefix + "SendStreamingMessage")
        assert read.fullmatch(prefix + "GetTask") and not read.fullmatch(prefix + "SendMessage")
        assert not stream.fullmatch(prefix + "SendMessage")
        assert not read.fullmatch(prefix + "GetTaskX")
    assert stream.fullmatch("/lf.a2a.v1.A2AService/SubscribeToTask")
    assert read.fullmatch("/lf.a2a.v1.A2AService/ListTaskPushNotificationConfigs")


CARD_RULE = {"to": [{"operation": {
    "ports": ["8080"], "methods": ["GET", "HEAD"], "paths": ["/.well-known/agent-card.json"],
}}]}  # fmt: skip
"""The rule that lets anyone, without a token, read an agent's card."""


def test_authorization_allows_only_agents_listing_it_as_partner() -> None:
    objs = _objects()
    gateway = _find(objs, "AuthorizationPolicy", "mse-gateway-assistant")
    assert gateway["spec"]["rules"] == [
        {"from": [{"source": {"principals": [
            "cluster.local/ns/agents/sa/specmesh-agent-mse-nacos-helper"
        ]}}]},
        CARD_RULE,
    ]  # fmt: skip
    helper = _find(objs, "AuthorizationPolicy", "mse-nacos-helper")
    # nobody lists it and it admits no external caller: only its card can be read
    assert helper["spec"]["rules"] == [CARD_RULE]


BAD: list[tuple[str, str, str, Any, str]] = [
    (
        "weights not summing to 100",
        "VirtualService", "spec.http.1.route.0.weight", 50,
        "VirtualService/schedulex-assistant: spec.http[1].route: weights must sum to 100 (got 60)",
    ),
    (
        "retry policy istiod refuses",
        "VirtualService", "spec.http.1.retries.retryOn", "reset,sometimes",
        "VirtualService/schedulex-assistant: spec.http[1].retries.retryOn: 'sometimes' is not a "
        "valid retryOn policy",
    ),
    (
        "retries configured while disabled",
        "VirtualService", "spec.http.1.retries.attempts", 0,
        "VirtualService/schedulex-assistant: spec.http[1].retries: perTryTimeout, retryOn set "
        "while attempts is 0 (retries disabled)",
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
