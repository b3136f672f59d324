"""The sidecar's caller policy: bearer tokens (inline JWKS), callers.agents/principals, the
refusal bodies (AIP-193 JSON, google.rpc.Status), Istio's X-Forwarded-Client-Cert, settings."""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from google.rpc import code_pb2, error_details_pb2
from pydantic import ValidationError

from sidecar.callers import (
    CallerPolicy,
    CallerRefused,
    JwtVerifier,
    MalformedXfccError,
    agent_from_spiffe,
    agent_from_xfcc,
    bearer_token,
    parse_xfcc,
)
from sidecar.inbound import InMemoryPartnerGraph
from sidecar.settings import SidecarSettings
from specmesh.issuers import JwtIssuer
from specmesh.spec.models import CallersSpec

AGENT = "Billing_Bot"
RN = "billing-bot"
ISS = "https://idp.example.com"
EC_KEY = ec.generate_private_key(ec.SECP256R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _jwk(key: Any, kid: str) -> dict[str, Any]:
    public = key.public_key()
    if isinstance(key, ec.EllipticCurvePrivateKey):
        data = jwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        data = jwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
    return {**data, "kid": kid}


ISSUER = JwtIssuer(
    issuer=ISS, jwks={"keys": [_jwk(EC_KEY, "ec1"), _jwk(RSA_KEY, "rsa1")]}, audiences=("{agent}",)
)


def _token(*, key: Any = EC_KEY, alg: str = "ES256", kid: str | None = "ec1", **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": ISS, "sub": "alice", "aud": RN, "iat": now, "exp": now + 60, **claims}
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key, alg, headers)


def _policy(
    callers: CallersSpec | None = None,
    graph: dict[str, list[str]] | None = None,
    issuers: list[JwtIssuer] | None = None,
) -> CallerPolicy:
    return CallerPolicy(
        agent=AGENT,
        graph=InMemoryPartnerGraph(graph or {}),
        callers=lambda: callers,
        verifier=JwtVerifier(issuers=[ISSUER] if issuers is None else issuers, agent=AGENT),
    )


async def _refused(policy: CallerPolicy, authorization: str | None) -> CallerRefused:
    with pytest.raises(CallerRefused) as info:
        await policy.external(authorization)
    return info.value


# ---------------------------------------------------------------- tokens


@pytest.mark.parametrize(
    ("key", "alg", "kid"), [(EC_KEY, "ES256", "ec1"), (RSA_KEY, "RS256", "rsa1")]
)
async def test_valid_token_gives_the_request_principal(key: Any, alg: str, kid: str) -> None:
    policy = _policy(CallersSpec(principals=[f"{ISS}/*"]))
    principal = await policy.external(f"Bearer {_token(key=key, alg=alg, kid=kid)}")
    assert principal == f"{ISS}/alice"


@pytest.mark.parametrize(
    ("token", "said"),
    [
        (lambda: _token(exp=int(time.time()) - 120), "expired"),
        (lambda: _token(nbf=int(time.time()) + 600), "not valid yet"),
        (lambda: _token(aud="someone-else"), "wrong audience"),
        (lambda: _token(aud=None), "no 'aud' claim"),
        (lambda: _token(exp=None), "no 'exp' claim"),
        (lambda: _token(iss="https://evil.example"), "'https://evil.example' is not trusted"),
        (lambda: _token(kid="nope"), "has no key 'nope'"),
        (lambda: _token(key=ec.generate_private_key(ec.SECP256R1())), "does not verify"),
        (lambda: _token(key=None, alg="none", kid=None), "'none' is not allowed"),
        (lambda: _token(key="a-shared-secret-of-32-bytes-long!", alg="HS256"), "'HS256'"),
        (lambda: "not.a.jwt", "not a well-formed JWT"),
        (lambda: _token(key=RSA_KEY, alg="RS256", kid="ec1"), "(EC) cannot verify RS256"),
        (lambda: _token(key=EC_KEY, alg="ES256", kid="rsa1"), "(RSA) cannot verify ES256"),
    ],
)
async def test_bad_tokens_are_unauthenticated_naming_why(token: Any, said: str) -> None:
    value = token()
    refused = await _refused(_policy(CallersSpec(principals=["*"])), f"Bearer {value}")
    assert refused.reason == "UNAUTHENTICATED" and refused.bad_token
    assert said in refused.message
    assert value not in refused.message


async def test_leeway_accepts_a_token_just_expired() -> None:
    policy = _policy(CallersSpec(principals=["*"]))
    assert await policy.external(f"Bearer {_token(exp=int(time.time()) - 5)}") == f"{ISS}/alice"


async def test_missing_or_malformed_authorization() -> None:
    policy = _policy(CallersSpec(principals=["*"]))
    missing = await _refused(policy, None)
    assert missing.reason == "UNAUTHENTICATED" and not missing.bad_token
    assert "none was sent" in missing.message
    basic = await _refused(policy, "Basic dXNlcjpwdw==")
    assert basic.bad_token and "not 'Bearer <token>'" in basic.message
    assert bearer_token("bearer  abc ") == "abc"
    with pytest.raises(ValueError, match="empty"):
        bearer_token("Bearer ")


async def test_no_trusted_issuer_refuses_every_token() -> None:
    refused = await _refused(
        _policy(CallersSpec(principals=["*"]), issuers=[]), f"Bearer {_token()}"
    )
    assert refused.reason == "UNAUTHENTICATED" and "SPECMESH_JWT_ISSUERS" in refused.message


async def test_literal_audience_is_accepted_beside_the_agent() -> None:
    issuer = JwtIssuer(issuer=ISS, jwks=ISSUER.jwks, audiences=("{agent}", "all-agents"))
    policy = _policy(CallersSpec(principals=["*"]), issuers=[issuer])
    assert await policy.external(f"Bearer {_token(aud='all-agents')}") == f"{ISS}/alice"


# ---------------------------------------------------------------- who may call


async def test_principals_default_to_nobody_and_match_by_pattern() -> None:
    default = await _refused(_policy(None), f"Bearer {_token()}")
    assert default.reason == "PERMISSION_DENIED" and "callers.principals" in default.message
    exact = _policy(CallersSpec(principals=[f"{ISS}/alice"]))
    assert await exact.external(f"Bearer {_token()}") == f"{ISS}/alice"
    bob = await _refused(exact, f"Bearer {_token(sub='bob')}")
    assert bob.reason == "PERMISSION_DENIED" and f"{ISS}/bob" in bob.message


def test_agents_need_the_partner_edge_and_callers_agents() -> None:
    graph = {"caller-a": [AGENT], "caller-b": [AGENT], "stranger": []}
    everyone = _policy(None, graph)
    everyone.check_agent("caller-a")
    everyone.check_agent("caller-b")
    with pytest.raises(CallerRefused, match="does not list it among its partners"):
        everyone.check_agent("stranger")
    only_a = _policy(CallersSpec(agents=["Caller_A"]), graph)
    only_a.check_agent("caller-a")
    with pytest.raises(CallerRefused, match=r"callers\.agents") as info:
        only_a.check_agent("caller-b")
    assert info.value.reason == "PERMISSION_DENIED"


# ---------------------------------------------------------------- refusals


def test_refusal_renders_aip193_json_and_rpc_status() -> None:
    refused = CallerRefused("UNAUTHENTICATED", "the token has expired", agent=RN, bad_token=True)
    response = refused.http_response()
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="specmesh", error="invalid_token"'
    assert response.text is not None
    assert json.loads(response.text) == {
        "error": {
            "code": 401,
            "status": "UNAUTHENTICATED",
            "message": "the token has expired",
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "UNAUTHENTICATED",
                    "domain": "specmesh.io",
                    "metadata": {"agent": RN},
                }
            ],
        }
    }
    status = CallerRefused("PERMISSION_DENIED", "no", agent=RN).rpc_status()
    assert status.code == code_pb2.PERMISSION_DENIED and status.message == "no"
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "PERMISSION_DENIED",
        "specmesh.io",
        {"agent": RN},
    )
    assert (
        "WWW-Authenticate"
        not in CallerRefused("PERMISSION_DENIED", "no", agent=RN).http_response().headers
    )


# ---------------------------------------------------------------- identities


def test_spiffe_and_xfcc() -> None:
    assert agent_from_spiffe("spiffe://specmesh.local/agent/caller-a") == "caller-a"
    assert agent_from_spiffe("spiffe://cluster.local/ns/x/sa/specmesh-agent-caller-a") == "caller-a"
    assert agent_from_spiffe("spiffe://cluster.local/ns/x/sa/default") is None
    assert agent_from_spiffe("https://cluster.local/ns/x/sa/specmesh-agent-a") is None
    real = 'By=spiffe://cluster.local/ns/x/sa/specmesh-agent-me;Hash=ab;Subject="";URI=spiffe://cluster.local/ns/x/sa/specmesh-agent-caller-a'
    forged = 'By=x;Subject="CN=a,O=b";URI=spiffe://cluster.local/ns/x/sa/specmesh-agent-admin'
    assert agent_from_xfcc(real) == "caller-a"
    assert agent_from_xfcc(f"{forged},{real}") == "caller-a"  # only the last element counts
    assert agent_from_xfcc(f"{real},Hash=cd") is None
    assert agent_from_xfcc(None) is None


def test_an_xfcc_shaped_to_hide_the_proxys_element_names_nobody() -> None:
    """A client's own XFCC with an open quote would swallow the element the local proxy
    appends; the strict parser refuses the whole value (and a second URI in one element)."""
    victim = "URI=spiffe://cluster.local/ns/x/sa/specmesh-agent-victim"
    real = 'By=spiffe://cluster.local/ns/x/sa/specmesh-agent-me;Hash=ab;Subject="";URI=spiffe://cluster.local/ns/x/sa/specmesh-agent-caller-a'
    assert agent_from_xfcc(f'{victim};X=",{real}') is None
    assert agent_from_xfcc(f'{victim};X=\\",{real}') is None
    assert agent_from_xfcc(f"{real};{victim}") is None  # two URIs in the last element
    with pytest.raises(MalformedXfccError, match="unterminated"):
        parse_xfcc('a="b')
    assert parse_xfcc('Subject="CN=a,O=\\"b\\"";URI=u') == [{"subject": 'CN=a,O="b"', "uri": "u"}]


def test_an_istio_caller_must_be_of_this_trust_domain_and_namespace() -> None:
    uri = "spiffe://cluster.local/ns/agents/sa/specmesh-agent-caller-a"
    assert agent_from_spiffe(uri, trust_domain="cluster.local", namespace="agents") == "caller-a"
    assert agent_from_spiffe(uri, trust_domain="evil.td") is None
    assert agent_from_spiffe(uri, namespace="other") is None
    assert agent_from_spiffe("spiffe://cluster.local/ns/a/sa/specmesh-agent-Not_A_Name") is None
    assert agent_from_spiffe("spiffe://specmesh.local/agent/") is None


# ---------------------------------------------------------------- configuration


def test_issuer_needs_exactly_one_key_source_and_an_audience() -> None:
    with pytest.raises(ValidationError, match="exactly one of jwksUri and jwks"):
        JwtIssuer(issuer=ISS)
    with pytest.raises(ValidationError, match="exactly one of jwksUri and jwks"):
        JwtIssuer.model_validate({"issuer": ISS, "jwksUri": "http://x/j", "jwks": {"keys": []}})
    with pytest.raises(ValidationError, match="at least one audience"):
        JwtIssuer.model_validate({"issuer": ISS, "jwksUri": "http://x/j", "audiences": []})
    default = JwtIssuer.model_validate({"issuer": ISS, "jwksUri": "http://x/j"})
    assert default.audiences == ("{agent}",)
    assert JwtVerifier(issuers=[default], agent=AGENT).audiences(default) == [RN]


def test_settings_read_issuers_and_entry_listeners(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_NAME", AGENT)
    monkeypatch.setenv(
        "SPECMESH_JWT_ISSUERS",
        json.dumps([{"issuer": "specmesh", "jwksUri": "http://127.0.0.1:1/.well-known/jwks.json"}]),
    )
    monkeypatch.setenv("SPECMESH_ENTRY", "127.0.0.1:7110")
    monkeypatch.setenv("SPECMESH_ENTRY_GRPC", "127.0.0.1:7111")
    settings = SidecarSettings()
    assert [i.issuer for i in settings.jwt_issuers] == ["specmesh"]
    assert (settings.entry, settings.entry_grpc) == ("127.0.0.1:7110", "127.0.0.1:7111")
    monkeypatch.setenv("SPECMESH_JWT_ISSUERS", json.dumps([{"issuer": "x"}]))
    with pytest.raises(ValidationError, match=r"SPECMESH_JWT_ISSUERS\[0\]: set exactly one"):
        SidecarSettings()
    monkeypatch.setenv(
        "SPECMESH_JWT_ISSUERS",
        json.dumps([{"issuer": "x", "jwksUri": "http://k/j", "audiences": []}]),
    )
    with pytest.raises(ValidationError, match=r"SPECMESH_JWT_ISSUERS\[0\]\.audiences: must name"):
        SidecarSettings()


async def test_a_jwk_pinning_its_algorithm_verifies_only_that_one() -> None:
    pinned = {**_jwk(RSA_KEY, "rsa1"), "alg": "PS256"}
    issuer = JwtIssuer(issuer=ISS, jwks={"keys": [pinned]})
    policy = _policy(CallersSpec(principals=["*"]), issuers=[issuer])
    ps = _token(key=RSA_KEY, alg="PS256", kid="rsa1")
    assert await policy.external(f"Bearer {ps}") == f"{ISS}/alice"
    refused = await _refused(policy, f"Bearer {_token(key=RSA_KEY, alg='RS256', kid='rsa1')}")
    assert "is for PS256, not RS256" in refused.message
