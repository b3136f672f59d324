"""Who may call an agent in Istio: the AuthorizationPolicy from ``base.callers`` and the
RequestAuthentication from the trusted issuers, validated against the Istio CRD schemas."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
from pydantic import ValidationError

from control_plane.istio import CRDS_PATH
from control_plane.mesh import (
    IstioValidator,
    MeshObjectError,
    MeshSettings,
    render_mesh,
)
from control_plane.settings import ControlPlaneSettings
from sidecar.callers import JwtVerifier
from sidecar.settings import SidecarSettings
from specmesh.callers import principal_matches
from specmesh.issuers import JwtIssuer, parse_jwt_issuers
from specmesh.spec.models import CallersSpec

Obj = dict[str, Any]
NS = "agents"
ISSUERS = (
    JwtIssuer(
        issuer="specmesh",
        jwks_uri="http://specmesh-control-plane.agents.svc.cluster.local:8090/.well-known/jwks.json",
        audiences=("{agent}",),
    ),
    JwtIssuer(
        issuer="https://idp.example.com",
        jwks={"keys": [{"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "BBBB", "kid": "k1"}]},
        audiences=("{agent}", "specmesh-agents"),
    ),
)


@pytest.fixture(scope="module")
def validator() -> IstioValidator:
    return IstioValidator(CRDS_PATH)


def _spiffe(agent: str) -> str:
    return f"cluster.local/ns/{NS}/sa/specmesh-agent-{agent}"


def _render(
    callers: dict[str, CallersSpec | None],
    graph: dict[str, list[str]],
    *,
    issuers: tuple[JwtIssuer, ...] = ISSUERS,
) -> list[Obj]:
    agents = {"mse-nacos-helper": None, "mse-gateway-assistant": None, "scheduleX-assistant": None}
    return render_mesh(
        agents,
        graph,
        settings=MeshSettings(namespace=NS, jwt_issuers=issuers),
        callers=callers,
    )


def _find(objs: list[Obj], kind: str, name: str) -> Obj:
    return next(o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name)


@dataclass(frozen=True)
class Request:
    """What Istio's AuthorizationPolicy sees of a request."""

    principal: str | None = None
    """The peer's mTLS identity."""
    request_principal: str | None = None
    """``<iss>/<sub>`` of a token the RequestAuthentication verified (None: no token)."""
    method: str = "POST"
    path: str = "/"
    port: int = 8080


def _allowed(policy: Obj, request: Request) -> bool:
    """Istio's ALLOW semantics: some rule whose every ``from``/``to`` matches (values of a
    field are OR'ed; ``principals`` and ``requestPrincipals`` need that identity)."""
    assert policy["spec"]["action"] == "ALLOW"

    def source_matches(source: Obj) -> bool:
        for field, value in (("principals", request.principal),
                             ("requestPrincipals", request.request_principal)):  # fmt: skip
            if field in source and not (
                value is not None and any(principal_matches(p, value) for p in source[field])
            ):
                return False
        return True

    def operation_matches(op: Obj) -> bool:
        return (
            ("ports" not in op or str(request.port) in op["ports"])
            and ("methods" not in op or request.method in op["methods"])
            and ("paths" not in op or request.path in op["paths"])
        )

    for rule in policy["spec"].get("rules", []):
        froms = rule.get("from", [])
        tos = rule.get("to", [])
        if froms and not any(source_matches(f["source"]) for f in froms):
            continue
        if tos and not any(operation_matches(t["operation"]) for t in tos):
            continue
        return True
    return False


def test_principals_render_request_principals(validator: IstioValidator) -> None:
    spec = CallersSpec(principals=["specmesh/alice", "https://idp.example.com/*"])
    objs = _render({"scheduleX-assistant": spec}, {"mse-nacos-helper": ["scheduleX-assistant"]})
    validator.check(objs)
    ap = _find(objs, "AuthorizationPolicy", "schedulex-assistant")
    assert {"from": [{"source": {"requestPrincipals": [
        "https://idp.example.com/*", "specmesh/alice",
    ]}}]} in ap["spec"]["rules"]  # fmt: skip
    assert _allowed(ap, Request(request_principal="specmesh/alice"))
    assert _allowed(ap, Request(request_principal="https://idp.example.com/bob"))
    assert not _allowed(ap, Request(request_principal="specmesh/mallory"))
    # the partner keeps its access over mTLS, without a token
    assert _allowed(ap, Request(principal=_spiffe("mse-nacos-helper")))


def test_agent_nobody_lists_with_principals_is_not_deny_all(validator: IstioValidator) -> None:
    objs = _render({"mse-gateway-assistant": CallersSpec(principals=["specmesh/alice"])}, {})
    validator.check(objs)
    ap = _find(objs, "AuthorizationPolicy", "mse-gateway-assistant")
    assert ap["spec"]["rules"], "an ALLOW policy without rules denies everything"
    assert _allowed(ap, Request(request_principal="specmesh/alice"))
    assert not _allowed(ap, Request(principal=_spiffe("mse-nacos-helper")))


def test_a_request_without_a_token_passes_no_principal_rule(validator: IstioValidator) -> None:
    objs = _render({"mse-gateway-assistant": CallersSpec(principals=["*"])}, {})
    validator.check(objs)
    ap = _find(objs, "AuthorizationPolicy", "mse-gateway-assistant")
    assert _allowed(ap, Request(request_principal="https://idp.example.com/anyone"))
    assert not _allowed(ap, Request())  # "*" needs a verified token, not its absence
    assert not _allowed(ap, Request(principal="cluster.local/ns/other/sa/default"))
    # every rule but the card's names who calls: nothing else is open
    open_rules = [r for r in ap["spec"]["rules"] if "from" not in r]
    assert open_rules == [{"to": [{"operation": {
        "ports": ["8080"], "methods": ["GET", "HEAD"], "paths": ["/.well-known/agent-card.json"],
    }}]}]  # fmt: skip


def test_the_card_is_readable_without_a_token(validator: IstioValidator) -> None:
    objs = _render({}, {})
    validator.check(objs)
    ap = _find(objs, "AuthorizationPolicy", "mse-nacos-helper")
    assert _allowed(ap, Request(method="GET", path="/.well-known/agent-card.json"))
    assert not _allowed(ap, Request(method="POST", path="/.well-known/agent-card.json"))
    assert not _allowed(ap, Request(method="GET", path="/v1/tasks/1"))
    assert not _allowed(ap, Request(method="GET", path="/.well-known/agent-card.json", port=8081))


def test_callers_agents_empty_excludes_partners(validator: IstioValidator) -> None:
    graph = {"mse-nacos-helper": ["scheduleX-assistant"], "mse-gateway-assistant":
             ["scheduleX-assistant"]}  # fmt: skip
    objs = _render({"scheduleX-assistant": CallersSpec(agents=[])}, graph)
    validator.check(objs)
    ap = _find(objs, "AuthorizationPolicy", "schedulex-assistant")
    assert not any("principals" in f["source"] for r in ap["spec"]["rules"]
                   for f in r.get("from", []))  # fmt: skip
    assert not _allowed(ap, Request(principal=_spiffe("mse-nacos-helper")))


def test_callers_agents_admit_by_logical_or_resource_name(validator: IstioValidator) -> None:
    graph = {"mse-nacos-helper": ["scheduleX-assistant"], "mse-gateway-assistant":
             ["scheduleX-assistant"]}  # fmt: skip
    objs = _render({"scheduleX-assistant": CallersSpec(agents=["mse-nacos-helper"])}, graph)
    validator.check(objs)
    ap = _find(objs, "AuthorizationPolicy", "schedulex-assistant")
    assert ap["spec"]["rules"][0] == {
        "from": [{"source": {"principals": [_spiffe("mse-nacos-helper")]}}]
    }
    assert _allowed(ap, Request(principal=_spiffe("mse-nacos-helper")))
    assert not _allowed(ap, Request(principal=_spiffe("mse-gateway-assistant")))
    # a name in callers.agents grants nothing without the partner listing: the gateway
    # assistant is admitted by name but lists no partner here
    objs = _render({"mse-nacos-helper": CallersSpec(agents=["mse-gateway-assistant"])}, {})
    helper = _find(objs, "AuthorizationPolicy", "mse-nacos-helper")
    assert not _allowed(helper, Request(principal=_spiffe("mse-gateway-assistant")))


def test_issuers_render_to_jwt_rules(validator: IstioValidator) -> None:
    objs = _render({}, {})
    validator.check(objs)
    ra = _find(objs, "RequestAuthentication", "schedulex-assistant")
    assert ra["spec"]["selector"] == {"matchLabels": {"specmesh.io/agent": "schedulex-assistant"}}
    own, idp = ra["spec"]["jwtRules"]
    assert own == {
        "issuer": "specmesh",
        "jwksUri": "http://specmesh-control-plane.agents.svc.cluster.local:8090/.well-known/jwks.json",
        "audiences": ["schedulex-assistant"],
        "forwardOriginalToken": True,
    }
    assert idp["audiences"] == ["schedulex-assistant", "specmesh-agents"]
    assert json.loads(idp["jwks"])["keys"][0]["kid"] == "k1"
    assert idp["forwardOriginalToken"] is True
    assert "jwksUri" not in idp
    # one per agent: the audience is the agent's own name
    helper = _find(objs, "RequestAuthentication", "mse-nacos-helper")
    assert helper["spec"]["jwtRules"][0]["audiences"] == ["mse-nacos-helper"]


def test_without_issuers_no_request_authentication() -> None:
    objs = _render({}, {}, issuers=())
    assert not [o for o in objs if o["kind"] == "RequestAuthentication"]


def test_validator_refuses_a_jwks_uri_istio_refuses(validator: IstioValidator) -> None:
    # the model refuses it first; the validator must too, whatever builds the object
    bad = (JwtIssuer.model_construct(issuer="x", jwks_uri="ftp://keys.example.com/jwks"),)
    objs = _render({}, {}, issuers=bad)
    with pytest.raises(MeshObjectError) as e:
        validator.check(objs)
    assert "jwtRules[0].jwksUri: url must have scheme http:// or https://" in str(e.value)


def test_parse_jwt_issuers_reads_the_design_format() -> None:
    text = json.dumps([
        {"issuer": "specmesh", "jwksUri": "http://cp:8090/.well-known/jwks.json",
         "jwks": None, "audiences": ["{agent}"]},
        {"issuer": "https://idp", "jwksUri": None, "jwks": {"keys": []}},
    ])  # fmt: skip
    own, idp = parse_jwt_issuers(text)
    assert own == JwtIssuer(issuer="specmesh", jwks_uri="http://cp:8090/.well-known/jwks.json")
    assert idp.jwks == {"keys": []} and idp.jwks_uri is None
    assert idp.audiences == ("{agent}",)  # omitted: the agent's own name, never "any"
    assert parse_jwt_issuers("") == ()


def test_request_authentication_admits_exactly_the_audiences_the_sidecar_admits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # one SPECMESH_JWT_ISSUERS, as the chart sets it on both: one parser, one object
    text = json.dumps([
        {"issuer": "specmesh", "jwksUri": "http://cp:8090/jwks"},
        {"issuer": "https://idp", "jwks": {"keys": []}, "audiences": ["{agent}", "all", "all"]},
    ])  # fmt: skip
    monkeypatch.setenv("SPECMESH_JWT_ISSUERS", text)
    monkeypatch.setenv("AGENT_NAME", "Billing_Bot")
    mesh = ControlPlaneSettings(mesh_namespace=NS).mesh()
    sidecar = SidecarSettings()
    assert sidecar.jwt_issuers == mesh.jwt_issuers

    objs = render_mesh({"Billing_Bot": None}, {}, settings=mesh, callers={})
    rules = _find(objs, "RequestAuthentication", "billing-bot")["spec"]["jwtRules"]
    verifier = JwtVerifier(issuers=sidecar.jwt_issuers, agent=sidecar.agent_name)
    accepted = [verifier.audiences(i) for i in sidecar.jwt_issuers]
    assert [r["audiences"] for r in rules] == accepted
    assert accepted == [["billing-bot"], ["billing-bot", "all"]]  # never empty ("any")


def test_control_plane_settings_refuse_bad_issuers_and_build_the_mesh_settings() -> None:
    with pytest.raises(ValidationError, match=r"SPECMESH_JWT_ISSUERS\[0\]\.issuer"):
        ControlPlaneSettings(jwt_issuers='[{"issuer": ""}]')
    with pytest.raises(ValidationError, match=r"SPECMESH_JWT_ISSUERS\[0\]\.audiences"):
        ControlPlaneSettings(
            jwt_issuers='[{"issuer": "a", "jwksUri": "http://k", "audiences": []}]'
        )
    settings = ControlPlaneSettings(
        mesh_namespace=NS,
        mesh_routes="gateway-api",
        jwt_issuers=json.dumps(
            [{"issuer": "specmesh", "jwksUri": "http://cp:8090/jwks", "audiences": ["{agent}"]}]
        ),
    ).mesh()
    assert settings == MeshSettings(
        namespace=NS,
        routes="gateway-api",
        jwt_issuers=(JwtIssuer(issuer="specmesh", jwks_uri="http://cp:8090/jwks"),),
    )
