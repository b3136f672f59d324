"""The control plane as a token issuer, on real etcd and OpenBao: invoke tokens verified
with the served JWKS (PyJWT), who may mint them, one signing key for every replica."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import requests
from aiohttp.test_utils import TestServer

from control_plane.api import ControlPlane
from control_plane.auth import Principal, Role, StaticTokenAuthenticator, hash_token
from control_plane.grpc_api import build_servicers
from control_plane.http_api import build_app
from control_plane.issuer import SIGNING_KEY_PATH, TokenIssuer
from localfleet.installer import LocalServices
from specmesh.secrets import VaultRef
from specmesh.store import SpecStore
from specmesh.vault import VaultClient

from ..conftest import publish_prompt
from .cp_process import ControlPlaneProcess

pytestmark = pytest.mark.integration

TOKENS = {
    "viewer": "tok-viewer",
    "operator": "tok-operator",
    "admin": "tok-admin",
    "invoker": "tok-invoker",
    "secrets-admin": "tok-secrets",
}
AGENT = {
    "apiVersion": "specmesh.io/v1",
    "kind": "Agent",
    "metadata": {"name": "Helper_Bot"},
    "spec": {"base": {"description": "d", "promptKey": "p"}, "model": {"model": "m"}},
}


@pytest.fixture
async def api(store: SpecStore, vault: VaultClient) -> AsyncIterator[TestServer]:
    await publish_prompt(store)
    authenticator = StaticTokenAuthenticator(
        {hash_token(t): Principal(f"user-{r}", frozenset({Role(r)})) for r, t in TOKENS.items()}
    )
    issuer = TokenIssuer(vault=vault, issuer="specmesh-test", ttl_seconds=120)
    server = TestServer(_app(ControlPlane(store=store, vault=vault, issuer=issuer), authenticator))
    await server.start_server()
    yield server
    await server.close()


def _app(cp: ControlPlane, authenticator: Any) -> Any:
    return build_app(cp, authenticator, build_servicers(cp, authenticator))


async def _call(server: TestServer, method: str, path: str, role: str | None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {TOKENS[role]}"} if role else {}
    body = {"manifest": AGENT} if path.endswith("/apply") else None
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, str(server.make_url(path)), json=body, headers=headers) as r,
    ):
        return r.status, await r.json()


def _verify(token: str, jwks: dict[str, Any], *, audience: str, issuer: str) -> dict[str, Any]:
    """The claims of ``token`` as a relying party checks them: signature by the key its
    ``kid`` names in ``jwks``, ES256 only, audience, issuer, expiry."""
    kid = jwt.get_unverified_header(token)["kid"]
    key = jwt.PyJWKSet.from_dict(jwks)[kid].key
    claims: dict[str, Any] = jwt.decode(
        token,
        key,
        algorithms=["ES256"],
        audience=audience,
        issuer=issuer,
        options={"require": ["exp", "iat", "iss", "sub", "aud", "jti"]},
    )
    return claims


async def test_operator_mints_a_token_that_verifies_with_the_jwks(
    api: TestServer, store: SpecStore
) -> None:
    assert (await _call(api, "POST", "/api/v1/apply", "admin"))[0] == 200

    status, minted = await _call(api, "POST", "/api/v1/agents/Helper_Bot/invoke-token", "operator")
    jwks_status, jwks = await _call(api, "GET", "/.well-known/jwks.json", None)  # no token

    assert status == 200, minted
    assert jwks_status == 200
    assert (minted["issuer"], minted["subject"], minted["audience"]) == (
        "specmesh-test",
        "user-operator",
        "helper-bot",
    )
    claims = _verify(minted["token"], jwks, audience="helper-bot", issuer="specmesh-test")
    assert claims["sub"] == "user-operator"
    assert claims["exp"] - claims["iat"] == 120
    assert datetime.fromisoformat(minted["expiresAt"]) == datetime.fromtimestamp(claims["exp"], UTC)
    with pytest.raises(jwt.InvalidAudienceError):
        _verify(minted["token"], jwks, audience="other-agent", issuer="specmesh-test")
    with pytest.raises(jwt.InvalidIssuerError):
        _verify(minted["token"], jwks, audience="helper-bot", issuer="someone-else")
    # the mint is audited (who, which agent), the token is not
    entries = await store.audit_entries(name="Helper_Bot", kind="Agent")
    mint = [e for e in entries if e.action == "invoke-token"]
    assert [e.actor for e in mint] == ["user-operator"]
    assert claims["jti"] in mint[0].message and minted["token"] not in str(mint[0].to_json())


async def test_an_expired_token_is_refused_by_a_verifier(vault: VaultClient) -> None:
    issuer = TokenIssuer(vault=vault, ttl_seconds=1, clock=lambda: 1_000_000.0)
    minted = await issuer.mint(subject="someone", audience="helper")

    with pytest.raises(jwt.ExpiredSignatureError):
        _verify(minted.token, await issuer.jwks(), audience="helper", issuer="specmesh")


@pytest.mark.parametrize(("role", "expected"), [("admin", 200), ("invoker", 200), ("viewer", 403),
                                                ("secrets-admin", 403), (None, 401)])  # fmt: skip
async def test_who_may_mint(api: TestServer, role: str | None, expected: int) -> None:
    await _call(api, "POST", "/api/v1/apply", "admin")

    status, body = await _call(api, "POST", "/api/v1/agents/helper_bot/invoke-token", role)

    assert status == expected, body
    if expected == 200:
        assert body["subject"] == f"user-{role}" and body["audience"] == "helper-bot"
    else:
        assert "token" not in body


async def test_unknown_agent_is_404(api: TestServer) -> None:
    status, body = await _call(api, "POST", "/api/v1/agents/nobody-here/invoke-token", "operator")

    assert status == 404
    assert "nobody-here" in body["error"]["message"]


async def test_the_signing_key_cannot_be_overwritten_or_shared_through_the_api(
    api: TestServer,
) -> None:
    headers = {"Authorization": f"Bearer {TOKENS['secrets-admin']}"}
    async with aiohttp.ClientSession() as s:
        async with s.put(
            str(api.make_url("/api/v1/credentials")),
            json={"path": SIGNING_KEY_PATH, "field": "privateKeyPem", "value": "mine"},
            headers=headers,
        ) as r:
            put_status, put_body = r.status, await r.json()
        async with s.put(
            str(api.make_url("/api/v1/agents/helper/grants")),
            json={"secret": f"vault://secret/{SIGNING_KEY_PATH}"},
            headers=headers,
        ) as r:
            share_status = r.status

    assert (put_status, share_status) == (400, 400)
    assert "control plane's own keys" in put_body["error"]["message"]


async def test_replicas_racing_to_create_the_key_agree_on_one(
    services: LocalServices,
) -> None:
    path = f"specmesh/control-plane/test-{uuid.uuid4().hex[:8]}"
    clients = [
        VaultClient(address=services.bao.address, token=services.bao.root_token) for _ in range(4)
    ]
    try:
        issuers = [TokenIssuer(vault=c, key_path=path) for c in clients]

        kids = await asyncio.gather(*(i.load() for i in issuers))

        assert len(set(kids)) == 1
        versions = await clients[0].versions(mount="secret", path=path)
        assert list(versions) == [1]  # written once: the losers read the winner's key
        stored = await clients[0].read(VaultRef.parse(f"vault://secret/{path}#privateKeyPem"))
        assert stored.startswith("-----BEGIN PRIVATE KEY-----")
    finally:
        for c in clients:
            await c.close()


def test_two_control_planes_over_one_vault_and_etcd_share_the_key(
    services: LocalServices, tmp_path: Path
) -> None:
    """Two real control-plane processes (same etcd prefix, same Vault): a token minted by
    one verifies with the other's JWKS."""
    token = f"tok-{uuid.uuid4().hex}"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = ControlPlaneProcess(services, tmp_path / "a", tokens={token: ("ci-op", [Role.ADMIN])})
    second = ControlPlaneProcess(
        services, tmp_path / "b", tokens={token: ("ci-op", [Role.ADMIN])}, prefix=first.prefix
    )
    try:
        url_a, url_b = first.start(), second.start()
        headers = {"Authorization": f"Bearer {token}"}
        prompt = {"apiVersion": "specmesh.io/v1", "kind": "Prompt", "metadata": {"name": "p"},
                  "spec": {"version": "1.0.0", "template": "hi"}}  # fmt: skip
        for manifest in (prompt, AGENT):
            r = requests.post(
                f"{url_a}/api/v1/apply", json={"manifest": manifest}, headers=headers, timeout=30
            )
            assert r.status_code == 200, r.text

        minted = requests.post(
            f"{url_a}/api/v1/agents/Helper_Bot/invoke-token", headers=headers, timeout=30
        ).json()
        jwks_a = requests.get(f"{url_a}/.well-known/jwks.json", timeout=30).json()
        jwks_b = requests.get(f"{url_b}/.well-known/jwks.json", timeout=30).json()

        assert jwks_a == jwks_b and len(jwks_b["keys"]) == 1
        claims = _verify(minted["token"], jwks_b, audience="helper-bot", issuer="specmesh")
        assert claims["sub"] == "ci-op"
        assert minted["token"] not in first.log.read_text() + second.log.read_text()
    finally:
        first.stop()
        second.stop()


BAD_NAMES = ["ci/deploy", "ops team", "star*", "tab\tname", "-leading-dash", "x" * 129, "ünï"]


@pytest.mark.parametrize("name", [*BAD_NAMES, "alice@example.com", "svc:ci.deploy-1_a"])
async def test_a_principal_name_that_is_no_usable_subject_gets_no_token(
    store: SpecStore, vault: VaultClient, name: str
) -> None:
    """``sub`` becomes the request principal ``<iss>/<sub>`` at the sidecar: a name with
    '/', '*', whitespace or control characters would be ambiguous there, so no token."""
    await publish_prompt(store)
    token = f"tok-{uuid.uuid4().hex}"
    authenticator = StaticTokenAuthenticator(
        {
            hash_token(token): Principal(name, frozenset({Role("invoker")})),
            hash_token(TOKENS["admin"]): Principal("user-admin", frozenset({Role("admin")})),
        }
    )
    issuer = TokenIssuer(vault=vault, issuer="specmesh-test", ttl_seconds=120)
    server = TestServer(_app(ControlPlane(store=store, vault=vault, issuer=issuer), authenticator))
    await server.start_server()
    try:
        assert (await _call(server, "POST", "/api/v1/apply", "admin"))[0] == 200
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                str(server.make_url("/api/v1/agents/Helper_Bot/invoke-token")),
                headers={"Authorization": f"Bearer {token}"},
            ) as r,
        ):
            status, body = r.status, await r.json()
    finally:
        await server.close()

    if name in BAD_NAMES:
        assert status == 400, body
        assert "token" not in body
        message = body["error"]["message"]
        assert "^[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}$" in message, message
        assert "\t" not in message  # the name is shown escaped
        mints = [e for e in await store.audit_entries(kind="Agent") if e.action == "invoke-token"]
        assert all(e.actor != name for e in mints)
    else:
        assert status == 200, body
        assert body["subject"] == name
