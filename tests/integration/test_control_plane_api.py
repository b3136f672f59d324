"""The control plane's REST API with real etcd and OpenBao: roles, deny by default, audit."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from control_plane.api import MASK, ControlPlane
from control_plane.grpc_api import build_servicers
from control_plane.http_api import build_app
from control_plane.istio import CRDS_PATH
from control_plane.mesh import IstioValidator
from specmesh.errors import SecretError, SecretUnavailableError
from specmesh.store import SpecStore
from specmesh.vault import VaultClient, agent_policy_name

from ..conftest import publish_prompt
from .release_support import observe_tracks
from .role_tokens import ROLE_TOKENS, rest_call, role_authenticator

pytestmark = pytest.mark.integration

TOKENS = ROLE_TOKENS
AGENT = {
    "apiVersion": "specmesh.io/v1",
    "kind": "Agent",
    "metadata": {"name": "helper"},
    "spec": {
        "base": {"description": "d", "promptKey": "p"},
        "model": {"model": "m", "apiKey": "sk-planted-canary-77"},
    },
}


@pytest.fixture
async def api(store: SpecStore, vault: VaultClient) -> AsyncIterator[TestServer]:
    await publish_prompt(store)
    authenticator = role_authenticator()
    istio = IstioValidator(CRDS_PATH)
    cp = ControlPlane(store=store, vault=vault, istio=istio)
    server = TestServer(build_app(cp, authenticator, build_servicers(cp, authenticator)))
    await server.start_server()
    yield server
    await server.close()


async def _call(
    server: TestServer, method: str, path: str, role: str | None, body: Any = None
) -> tuple[int, Any]:
    return await rest_call(server, method, path, TOKENS[role] if role else None, body)


CALLS: list[tuple[str, str, str, Any]] = [
    ("list agents", "GET", "/api/v1/agents", None),
    ("apply agent", "POST", "/api/v1/apply", {"manifest": AGENT}),
    (
        "set release",
        "PUT",
        "/api/v1/agents/helper/release",
        {"canaryRevision": 1, "canaryWeight": 10},
    ),
    ("list credentials", "GET", "/api/v1/credentials", None),
    (
        "put credential",
        "PUT",
        "/api/v1/credentials",
        {"path": "specmesh/shared/x", "field": "token", "value": "v-secret-1"},
    ),
    ("audit", "GET", "/api/v1/audit", None),
    ("mesh", "GET", "/api/v1/mesh", None),
    ("create token", "POST", "/api/v1/tokens", {"name": "t", "roles": ["secrets-admin"]}),
    ("list tokens", "GET", "/api/v1/tokens", None),
    ("revoke token", "DELETE", "/api/v1/tokens/{token}", None),
]

ALLOWED = {
    "viewer": {"list agents", "mesh"},
    "operator": {"list agents", "apply agent", "set release", "audit", "mesh"},
    "admin": {"list agents", "apply agent", "set release", "audit", "mesh"},
    "secrets-admin": {
        "list credentials",
        "put credential",
        "audit",
        "create token",
        "list tokens",
        "revoke token",
    },
}


@pytest.mark.parametrize("role", list(TOKENS))
async def test_role_by_call_table_denies_by_default(
    api: TestServer, store: SpecStore, role: str
) -> None:
    # the agent exists, its canary ready, so that release calls can succeed where allowed
    await _call(api, "POST", "/api/v1/apply", "admin", {"manifest": AGENT})
    await observe_tracks(store, "helper", canary=1)
    # ...and a token exists that the revoke call can revoke where allowed
    mint = {"name": "to-revoke", "roles": ["secrets-admin"]}
    _, token = await _call(api, "POST", "/api/v1/tokens", "secrets-admin", mint)
    outcomes = {}
    for name, method, path, body in CALLS:
        status, _ = await _call(api, method, path.format(token=token["apiToken"]["id"]), role, body)
        outcomes[name] = status

    allowed = {n for n, s in outcomes.items() if s not in (401, 403)}
    assert allowed == ALLOWED[role], outcomes
    assert all(outcomes[n] == 403 for n in set(outcomes) - ALLOWED[role])
    assert all(outcomes[n] < 300 for n in ALLOWED[role]), outcomes


async def test_no_or_unknown_token_is_401(api: TestServer) -> None:
    status, body = await _call(api, "GET", "/api/v1/agents", None)
    assert (status, body["error"]["code"]) == (401, "unauthenticated")
    async with (
        aiohttp.ClientSession() as s,
        s.get(str(api.make_url("/api/v1/agents")), headers={"Authorization": "Bearer nope"}) as r,
    ):
        assert r.status == 401


async def test_no_role_can_read_a_secret_value(api: TestServer) -> None:
    await _call(api, "POST", "/api/v1/apply", "operator", {"manifest": AGENT})
    status, _ = await _call(
        api,
        "PUT",
        "/api/v1/credentials",
        "secrets-admin",
        {
            "path": f"specmesh/shared/{uuid.uuid4().hex[:6]}",
            "field": "token",
            "value": "v-secret-2",
        },
    )
    assert status == 200
    seen = []
    for role in TOKENS:
        for path in ("/api/v1/agents/helper", "/api/v1/credentials", "/api/v1/audit"):
            status, body = await _call(api, "GET", path, role)
            seen.append(str(body))
    everything = "\n".join(seen)
    assert "sk-planted-canary-77" not in everything and "v-secret-2" not in everything
    _, listed = await _call(api, "GET", "/api/v1/credentials", "secrets-admin")
    creds = listed["credentials"]
    assert creds and {c["maskedValue"] for c in creds} == {MASK}


async def test_changes_are_audited_with_the_principal(api: TestServer, store: SpecStore) -> None:
    await _call(api, "POST", "/api/v1/apply", "operator", {"manifest": AGENT})
    await observe_tracks(store, "helper", canary=1)
    await _call(
        api,
        "PUT",
        "/api/v1/agents/helper/release",
        "operator",
        {"canaryRevision": 1, "canaryWeight": 20},
    )
    _, listed = await _call(api, "GET", "/api/v1/audit?name=helper", "admin")
    entries = listed["entries"]
    assert [(e["actor"], e["action"], e["kind"]) for e in entries][:2] == [
        ("user-operator", "release.set", "Release"),
        ("user-operator", "apply", "Agent"),
    ]
    assert any(c["path"] == "canaryWeight" for c in entries[0]["changes"])


async def test_release_promote_and_abort(api: TestServer, store: SpecStore) -> None:
    await _call(api, "POST", "/api/v1/apply", "operator", {"manifest": AGENT})
    changed = {**AGENT, "spec": {**AGENT["spec"], "model": {"model": "m2", "apiKey": "sk-x"}}}
    await _call(api, "POST", "/api/v1/apply", "operator", {"manifest": changed})
    await observe_tracks(store, "helper", canary=1)
    status, _ = await _call(
        api,
        "PUT",
        "/api/v1/agents/helper/release",
        "operator",
        {"stableRevision": 1, "canaryRevision": 2, "canaryWeight": 10},
    )
    assert status == 200
    _, mesh = await _call(api, "GET", "/api/v1/mesh", "viewer")
    vs = next(o for o in mesh["objects"] if o["kind"] == "VirtualService")
    assert [d["weight"] for d in vs["spec"]["http"][-1]["route"]] == [90, 10]
    status, body = await _call(api, "POST", "/api/v1/agents/helper/release/promote", "operator")
    promoted = body["release"]
    assert (status, promoted["stableRevision"], "canaryRevision" in promoted) == (200, "2", False)
    status, body = await _call(api, "POST", "/api/v1/agents/helper/release/abort", "operator")
    assert status == 400 and "has no canary" in body["error"]["message"]


@pytest.mark.parametrize(
    "api_key",
    [
        "vault://secret/specmesh/agents/thief/../helper/model/apiKey#value",
        "vault://secret/specmesh/agents/thief/%2e%2e/helper/model/apiKey#value",
        "vault://secret/specmesh/agents/thief/./x#value",
    ],
)
async def test_a_reference_walking_out_of_its_tree_is_refused_and_nothing_written(
    api: TestServer, store: SpecStore, api_key: str
) -> None:
    thief = {**AGENT, "metadata": {"name": "thief"},
             "spec": {**AGENT["spec"], "model": {"model": "m", "apiKey": api_key}}}  # fmt: skip

    status, body = await _call(api, "POST", "/api/v1/apply", "operator", {"manifest": thief})

    assert status == 400
    (issue,) = body["error"]["issues"]
    assert issue["path"] == "spec.model.apiKey"
    assert "bad secret reference: path segment" in issue["message"]
    assert await store.current_revision("thief") == 0


async def test_a_name_with_a_trailing_newline_is_refused(api: TestServer) -> None:
    named = {**AGENT, "metadata": {"name": "helper\n"}}
    status, body = await _call(api, "POST", "/api/v1/apply", "operator", {"manifest": named})
    assert status == 400
    assert body["error"]["issues"][0]["path"] == "metadata.name"


async def test_bad_input_gets_a_clear_error(api: TestServer) -> None:
    bad = {**AGENT, "spec": {**AGENT["spec"], "model": {"model": "m", "temperature": 7}}}
    status, body = await _call(api, "POST", "/api/v1/apply", "operator", {"manifest": bad})
    assert status == 400
    assert body["error"]["issues"][0]["path"] == "spec.model.temperature"
    assert body["error"]["issues"][0]["message"] == "must be <= 2 (got 7)"
    status, body = await _call(
        api, "GET", "/api/v1/agents/helper/diff?fromRevision=x&toRevision=1", "viewer"
    )
    assert (status, body["error"]["code"]) == (400, "bad_request")
    assert body["error"]["message"].startswith("query: Failed to parse fromRevision field")
    status, body = await _call(api, "GET", "/api/v1/agents/helper/diff?from=1", "viewer")
    assert (status, body["error"]["code"]) == (400, "bad_request")
    assert body["error"]["message"].startswith("query: unknown parameter 'from'")
    status, _ = await _call(api, "GET", "/api/v1/agents/nobody", "viewer")
    assert status == 404


# ------------------------------------------------------------ hostile input: 4xx, never 500


async def _send(
    server: TestServer, method: str, path: str, role: str, data: bytes
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {TOKENS[role]}", "Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, str(server.make_url(path)), data=data, headers=headers) as r,
    ):
        return r.status, await r.json()


@pytest.mark.parametrize(
    "regex", ["(", "(?P<x>a)(?P=x)", "a" * 257], ids=["unbalanced", "backreference", "too-long"]
)
async def test_a_release_regex_re2_refuses_is_a_400_naming_it_and_nothing_is_written(
    api: TestServer, store: SpecStore, regex: str
) -> None:
    await _call(api, "POST", "/api/v1/apply", "operator", {"manifest": AGENT})
    release = {"canaryRevision": 1, "headerMatch": [{"name": "x-canary", "regex": regex}]}

    status, body = await _call(api, "PUT", "/api/v1/agents/helper/release", "operator", release)

    assert status == 400
    (issue,) = body["error"]["issues"]
    assert issue["path"] == "headerMatch[0].regex"
    assert issue["message"].startswith(("not a valid RE2 pattern: ", "must be at most 256"))
    assert await store.get_release("helper") is None


async def test_a_body_over_the_limit_is_a_413_in_the_error_format(api: TestServer) -> None:
    huge = b'{"manifest": "' + b"x" * (2 * 1024 * 1024) + b'"}'

    status, body = await _send(api, "POST", "/api/v1/apply", "operator", huge)

    assert status == 413
    assert body["error"] == {"code": "too_large", "message": "body: must be at most 2097152 bytes"}


@pytest.mark.parametrize(
    "data", [b"[" * 100_000, b'{"a":' * 5000, b'{"manifest":' + b"[" * 70 + b"]" * 70 + b"}"],
    ids=["lists", "objects", "inside-a-manifest"],
)  # fmt: skip
async def test_a_deeply_nested_body_is_a_400_not_a_recursion_error(
    api: TestServer, store: SpecStore, data: bytes
) -> None:
    status, body = await _send(api, "POST", "/api/v1/apply", "operator", data)

    assert status == 400
    assert body["error"] == {"code": "bad_request", "message": "body: nested more than 65 deep"}
    assert await store.list_agents() == []


@pytest.mark.parametrize(
    "prefix", ["../../sys/policies/acl", "specmesh/../../sys", "sys/policies/acl", "specmesh//x/"]
)
async def test_a_credentials_prefix_outside_specmesh_is_a_400_naming_prefix(
    api: TestServer, prefix: str
) -> None:
    status, body = await _call(
        api, "GET", f"/api/v1/credentials?pathPrefix={prefix}", "secrets-admin"
    )

    assert status == 400
    assert body["error"]["code"] == "bad_request"
    assert body["error"]["message"].startswith("prefix: ")


async def test_an_answer_that_is_not_kv_is_a_clear_error_not_a_key_error(
    vault: VaultClient,
) -> None:
    # what the prefix check now keeps out: '..' walks hvac's URL to the sys API, whose
    # answer has no KV metadata
    with pytest.raises(SecretUnavailableError) as info:
        await vault.read_fields(mount="secret", path="../../sys/policies/acl/default")

    assert "has no data.data and data.metadata.version" in str(info.value)


async def test_a_credentials_prefix_under_specmesh_lists(api: TestServer) -> None:
    await _call(api, "POST", "/api/v1/apply", "operator", {"manifest": AGENT})

    status, body = await _call(
        api, "GET", "/api/v1/credentials?pathPrefix=specmesh/agents/helper/", "secrets-admin"
    )

    assert status == 200
    assert [c["field"] for c in body["credentials"]] == ["value"]
    assert body["credentials"][0]["path"].startswith("specmesh/agents/helper/")


async def test_a_path_name_with_a_trailing_newline_is_a_4xx(api: TestServer) -> None:
    await _call(api, "POST", "/api/v1/apply", "operator", {"manifest": AGENT})

    status, body = await _call(api, "GET", "/api/v1/agents/helper%0A", "viewer")

    assert status == 400
    assert body["error"]["code"] == "invalid_spec"
    assert "'helper\\n'" in body["error"]["message"]


async def test_deleting_an_agent_retires_its_vault_policy(
    api: TestServer, vault: VaultClient
) -> None:
    name = f"gone-{uuid.uuid4().hex[:6]}"
    agent = {**AGENT, "metadata": {"name": name}}
    assert (await _call(api, "POST", "/api/v1/apply", "operator", {"manifest": agent}))[0] == 200
    assert "specmesh/agents/" in await vault.read_policy(agent_policy_name(name))

    status, _ = await _call(api, "DELETE", f"/api/v1/agents/{name}", "operator")

    assert status == 200
    with pytest.raises(SecretError):  # a sidecar still holding the token reads nothing now
        await vault.read_policy(agent_policy_name(name))


@pytest.mark.parametrize(
    "path",
    ["specmesh/agents/helper/model/apiKey", "other/team/key", "specmesh"],
)
async def test_a_credential_is_written_only_under_specmesh_outside_agents_trees(
    api: TestServer, path: str
) -> None:
    body = {"path": path, "field": "value", "value": "v-not-written"}
    status, answer = await _call(api, "PUT", "/api/v1/credentials", "secrets-admin", body)
    assert status == 400 and answer["error"]["message"].startswith("path: ")
