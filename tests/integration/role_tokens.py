"""The static role tokens the control-plane tests sign in with, and one REST call."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from control_plane.auth import Principal, Role, StaticTokenAuthenticator, hash_token

ROLE_TOKENS = {
    "viewer": "tok-viewer",
    "operator": "tok-operator",
    "admin": "tok-admin",
    "secrets-admin": "tok-secrets",
}


def role_principals(tokens: Mapping[str, str] = ROLE_TOKENS) -> dict[str, Principal]:
    """Each token (by hash) as ``user-<role>`` holding that one role; names that are no
    role are left out."""
    roles = {str(r) for r in Role}
    return {
        hash_token(t): Principal(f"user-{r}", frozenset({Role(r)}))
        for r, t in tokens.items()
        if r in roles
    }


def role_authenticator() -> StaticTokenAuthenticator:
    return StaticTokenAuthenticator(role_principals())


async def rest_call(
    server: TestServer, method: str, path: str, token: str | None, body: Any = None
) -> tuple[int, Any]:
    """One JSON call to the control plane's REST API, as ``token`` (None: no token)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, str(server.make_url(path)), json=body, headers=headers) as r,
    ):
        return r.status, await r.json()
