"""API tokens with an expiry and revocation, in etcd, on real etcd and OpenBao: the REST and
gRPC APIs of one in-process control plane share one :class:`TokenAuthenticator` whose watch
applies what any replica writes, with no restart."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from aiohttp.test_utils import TestServer

from control_plane.api import ControlPlane
from control_plane.auth import Principal, Role, StaticTokenAuthenticator, hash_token
from control_plane.grpc_api import build_grpc_server, build_servicers
from control_plane.http_api import build_app
from control_plane.tokens import TokenAuthenticator, TokenRequest, TokenStore, token_id
from specmesh.errors import StoreUnavailableError
from specmesh.ports import free_port
from specmesh.store import SpecStore
from specmesh.v1 import control_plane_pb2 as pb
from specmesh.v1 import control_plane_pb2_grpc as pb_grpc
from specmesh.vault import VaultClient

from .role_tokens import ROLE_TOKENS, rest_call, role_principals

pytestmark = pytest.mark.integration

TOKENS = {
    **ROLE_TOKENS,
    "boss": "tok-boss",  # admin + secrets-admin, as the local fleet's admin token
    "stale": "tok-stale",  # a file token past its expiresAt
}
PAST = datetime(2020, 1, 1, tzinfo=UTC)


@dataclass
class Stack:
    rest: TestServer
    agents: pb_grpc.AgentServiceStub
    store: SpecStore
    static: StaticTokenAuthenticator


@pytest.fixture
async def stack(store: SpecStore, vault: VaultClient) -> AsyncIterator[Stack]:
    principals = role_principals(TOKENS)
    principals[hash_token(TOKENS["boss"])] = Principal(
        "boss", frozenset({Role.ADMIN, Role.SECRETS_ADMIN})
    )
    principals[hash_token(TOKENS["stale"])] = Principal("stale", frozenset({Role.ADMIN}))
    static = StaticTokenAuthenticator(principals, expires={hash_token(TOKENS["stale"]): PAST})
    async with TokenAuthenticator(etcd=store.etcd, keys=store.keys, static=static) as auth:
        assert await auth.wait_loaded(timeout=10)
        tokens = TokenStore(store=store, static=static, on_change=auth.observe)
        cp = ControlPlane(store=store, vault=vault, tokens=tokens)
        rest = TestServer(build_app(cp, auth, build_servicers(cp, auth)))
        await rest.start_server()
        address = f"127.0.0.1:{free_port()}"
        grpc_server = await build_grpc_server(cp, auth, address)
        await grpc_server.start()
        async with grpc.aio.insecure_channel(address) as channel:
            yield Stack(rest, pb_grpc.AgentServiceStub(channel), store, static)
        await grpc_server.stop(None)
        await rest.close()


async def _call(
    stack: Stack, method: str, path: str, token: str | None, body: Any = None
) -> tuple[int, Any]:
    return await rest_call(stack.rest, method, path, token, body)


async def _grpc(stack: Stack, token: str) -> tuple[grpc.StatusCode, str]:
    try:
        await stack.agents.ListAgents(
            pb.ListAgentsRequest(), metadata=(("authorization", f"Bearer {token}"),)
        )
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


async def _until(condition: Callable[[], Awaitable[bool]], *, within: float = 5.0) -> None:
    """Poll ``condition`` until it holds; fail past ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await condition():
        if loop.time() > deadline:
            pytest.fail(f"condition not met within {within} s")
        await asyncio.sleep(0.05)


async def _mint(stack: Stack, roles: list[str], ttl: int = 3600, name: str = "ci-bot") -> Any:
    body = {"name": name, "roles": roles, "ttlSeconds": ttl}
    status, minted = await _call(stack, "POST", "/api/v1/tokens", TOKENS["boss"], body)
    assert status == 200, minted
    return {"token": minted["token"], **minted["apiToken"]}


async def _tokens(stack: Stack) -> tuple[int, list[Any]]:
    status, body = await _call(stack, "GET", "/api/v1/tokens", TOKENS["boss"])
    return status, body.get("apiTokens", body)


async def _token_audit(stack: Stack) -> list[Any]:
    _, body = await _call(stack, "GET", "/api/v1/audit?kind=Token", TOKENS["boss"])
    return list(body["entries"])


async def _refused_with(stack: Stack, token: str, reason: str) -> bool:
    status, body = await _call(stack, "GET", "/api/v1/agents", token)
    code, details = await _grpc(stack, token)
    return (
        status == 401
        and reason in body["error"]["message"]
        and code == grpc.StatusCode.UNAUTHENTICATED
        and reason in details
    )


async def test_create_use_list_revoke_refused_on_rest_and_grpc(stack: Stack) -> None:
    minted = await _mint(stack, ["operator"])
    secret = minted["token"]
    assert minted["id"] == token_id(hash_token(secret))
    assert (minted["roles"], minted["state"], minted["createdBy"]) == (
        ["operator"],
        "active",
        "boss",
    )

    assert (await _call(stack, "GET", "/api/v1/agents", secret))[0] == 200
    assert (await _grpc(stack, secret))[0] == grpc.StatusCode.OK

    status, listed = await _tokens(stack)
    assert status == 200
    mine = next(t for t in listed if t["id"] == minted["id"])
    assert (mine["name"], mine["source"], mine["state"]) == ("ci-bot", "api", "active")
    assert {t["source"] for t in listed} == {"api", "file"}
    text = json.dumps(listed)
    assert secret not in text and hash_token(secret) not in text and 'token"' not in text
    stored = await stack.store.etcd.range(stack.store.keys.tokens(), prefix=True)
    assert stored.kvs and all(secret.encode() not in kv.value for kv in stored.kvs)

    status, body = await _call(stack, "DELETE", f"/api/v1/tokens/{minted['id']}", TOKENS["boss"])
    revoked = body["apiToken"]
    assert (status, revoked["state"], revoked["revokedBy"]) == (200, "revoked", "boss")
    await _until(lambda: _refused_with(stack, secret, "token revoked"))

    entries = await _token_audit(stack)
    assert [(e["action"], e["actor"], e["name"]) for e in entries] == [
        ("revoke", "boss", minted["id"]),
        ("create", "boss", minted["id"]),
    ]
    assert secret not in json.dumps(entries)


async def test_a_revocation_written_by_another_replica_is_refused_within_seconds(
    stack: Stack,
) -> None:
    minted = await _mint(stack, ["viewer"])
    assert (await _call(stack, "GET", "/api/v1/agents", minted["token"]))[0] == 200

    other_replica = TokenStore(store=SpecStore(etcd=stack.store.etcd, keys=stack.store.keys))
    await other_replica.revoke(minted["id"], actor="elsewhere")  # only the watch tells ours

    await _until(lambda: _refused_with(stack, minted["token"], "token revoked"))


async def test_a_token_minted_by_another_replica_is_accepted_within_seconds(
    stack: Stack,
) -> None:
    other_replica = TokenStore(store=SpecStore(etcd=stack.store.etcd, keys=stack.store.keys))
    secret, _ = await other_replica.create(
        TokenRequest(name="from-elsewhere", roles=[Role.VIEWER]), actor="elsewhere"
    )

    async def accepted() -> bool:
        return (await _call(stack, "GET", "/api/v1/agents", secret))[0] == 200

    await _until(accepted)


async def test_an_expired_token_is_refused(stack: Stack) -> None:
    minted = await _mint(stack, ["viewer"], ttl=1)

    await _until(lambda: _refused_with(stack, minted["token"], "token expired at"))

    _, listed = await _tokens(stack)
    assert next(t for t in listed if t["id"] == minted["id"])["state"] == "expired"


async def test_a_file_token_past_its_expires_at_is_refused(stack: Stack) -> None:
    assert await _refused_with(stack, TOKENS["stale"], f"token expired at {PAST.isoformat()}")


async def test_a_file_token_revoked_through_the_api_is_refused_without_restart(
    stack: Stack,
) -> None:
    operator = token_id(hash_token(TOKENS["operator"]))
    _, listed = await _tokens(stack)
    entry = next(t for t in listed if t["id"] == operator)
    assert (entry["name"], entry["source"], entry["state"]) == ("user-operator", "file", "active")
    assert (await _call(stack, "GET", "/api/v1/agents", TOKENS["operator"]))[0] == 200

    status, _ = await _call(stack, "DELETE", f"/api/v1/tokens/{operator}", TOKENS["boss"])

    assert status == 200
    await _until(lambda: _refused_with(stack, TOKENS["operator"], "token revoked"))
    again = await _call(stack, "DELETE", f"/api/v1/tokens/{operator}", TOKENS["boss"])
    assert (again[0], again[1]["apiToken"]["state"]) == (200, "revoked")  # idempotent
    entries = await _token_audit(stack)
    assert [e["action"] for e in entries] == ["revoke"]


@pytest.mark.parametrize("role", ["viewer", "operator", "admin"])
async def test_only_secrets_admin_may_create_list_or_revoke(stack: Stack, role: str) -> None:
    minted = await _mint(stack, ["viewer"])
    body = {"name": "x", "roles": ["viewer"]}
    for method, path, payload in (
        ("POST", "/api/v1/tokens", body),
        ("GET", "/api/v1/tokens", None),
        ("DELETE", f"/api/v1/tokens/{minted['id']}", None),
    ):
        status, answer = await _call(stack, method, path, TOKENS[role], payload)
        assert (status, answer["error"]["code"]) == (403, "permission_denied"), (method, answer)
    assert (await _call(stack, "GET", "/api/v1/agents", minted["token"]))[0] == 200


async def test_a_token_may_not_allow_more_than_its_creator(stack: Stack) -> None:
    sa = TOKENS["secrets-admin"]
    status, body = await _call(stack, "POST", "/api/v1/tokens", sa,
                               {"name": "up", "roles": ["operator"]})  # fmt: skip
    assert status == 403
    assert "may not mint a token with role operator" in body["error"]["message"]

    status, minted = await _call(stack, "POST", "/api/v1/tokens", sa,
                                 {"name": "peer", "roles": ["secrets-admin"]})  # fmt: skip
    assert status == 200
    expires = datetime.fromisoformat(minted["apiToken"]["expiresAt"])
    assert timedelta(days=29) < expires - datetime.now(UTC) <= timedelta(days=30)  # default
    status, _ = await _call(stack, "GET", "/api/v1/tokens", sa)
    assert status == 200
    minted_by_boss = await _mint(stack, ["admin", "secrets-admin"], name="boss-2")
    assert minted_by_boss["roles"] == ["admin", "secrets-admin"]


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({"name": "x", "roles": ["viewer"], "ttlSeconds": -1}, "ttlSeconds"),
        ({"name": "x", "roles": ["viewer"], "ttlSeconds": 90 * 86400 + 1}, "ttlSeconds"),
        ({"name": "x", "roles": ["root"]}, "roles[0]"),
        ({"name": "x", "roles": []}, "roles"),
        ({"name": "a\nb", "roles": ["viewer"]}, "name"),
    ],
)
async def test_a_bad_token_request_is_400_with_its_path(
    stack: Stack, body: dict[str, Any], path: str
) -> None:
    status, answer = await _call(stack, "POST", "/api/v1/tokens", TOKENS["boss"], body)
    assert status == 400, answer
    assert answer["error"]["issues"][0]["path"] == path


async def test_an_unknown_field_in_a_token_request_is_400_naming_it(stack: Stack) -> None:
    body = {"name": "x", "roles": ["viewer"], "secret": "mine"}
    status, answer = await _call(stack, "POST", "/api/v1/tokens", TOKENS["boss"], body)
    assert (status, answer["error"]["code"]) == (400, "bad_request")
    assert answer["error"]["message"].startswith(
        'body: Message type "specmesh.v1.CreateTokenRequest" has no field named "secret"'
    )


async def test_revoking_an_unknown_or_malformed_id(stack: Stack) -> None:
    boss = TOKENS["boss"]
    assert (await _call(stack, "DELETE", "/api/v1/tokens/0123456789ab", boss))[0] == 404
    assert (await _call(stack, "DELETE", "/api/v1/tokens/nope", boss))[0] == 400


async def test_until_etcd_is_read_every_token_is_refused(store: SpecStore) -> None:
    static = StaticTokenAuthenticator(
        {hash_token("t"): Principal("someone", frozenset({Role.ADMIN}))}
    )
    auth = TokenAuthenticator(etcd=store.etcd, keys=store.keys, static=static)

    with pytest.raises(StoreUnavailableError, match="not loaded yet"):
        auth.authenticate("Bearer t")
