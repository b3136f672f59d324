"""A process's own Vault identity (real OpenBao): a periodic token that the process renews
before it expires, and that stops working once revoked."""

from __future__ import annotations

import asyncio
import time

import pytest

from specmesh.errors import SecretError
from specmesh.vault import VaultClient, keep_token_alive

pytestmark = pytest.mark.integration


async def test_a_periodic_token_is_renewed_before_it_expires_and_dies_when_revoked(
    vault: VaultClient,
) -> None:
    token, accessor = await vault.create_identity_token(
        policies=["default"], period="4s", display_name="renew-test"
    )
    own = VaultClient(address=vault.address, token=token)
    renewing = asyncio.create_task(keep_token_alive(own, floor=0.5))
    try:
        # past two periods the token still answers: it was renewed, more than once
        deadline = time.monotonic() + 9
        while time.monotonic() < deadline:
            ttl = await own.token_ttl()
            assert ttl is not None and ttl > 0
            await asyncio.sleep(0.5)  # observing a lifetime: the wait is the point here
        assert await own.token_policies() == ["default"]

        await vault.revoke_accessor(accessor)

        with pytest.raises(SecretError):
            await own.token_ttl()
        assert await vault.token_ttl() is None  # root: never expires, nothing to renew
    finally:
        renewing.cancel()
        await own.close()
