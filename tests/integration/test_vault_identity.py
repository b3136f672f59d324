"""A process's own Vault identity (real OpenBao): a periodic token that the process renews
before it expires, and that stops working once revoked."""

from __future__ import annotations

import asyncio

import pytest

from specmesh.errors import SecretError
from specmesh.vault import VaultClient, keep_token_alive
from tests.polling import eventually

pytestmark = pytest.mark.integration


async def test_a_periodic_token_is_renewed_at_half_its_ttl_and_dies_when_revoked(
    vault: VaultClient,
) -> None:
    token, accessor = await vault.create_identity_token(
        policies=["default"], period="1h", display_name="renew-test"
    )
    own = VaultClient(address=vault.address, token=token)
    renewals: list[int | None] = []
    renew_self = own.renew_self

    async def renew_and_count() -> None:  # the real renewal, counted
        await renew_self()
        renewals.append(await own.token_ttl())

    own.renew_self = renew_and_count  # type: ignore[method-assign]
    asked: list[float] = []  # the renewal loop's clock, injected: what it waits for

    async def sleep(seconds: float) -> None:
        asked.append(seconds)
        if len(asked) > 2:
            await asyncio.Event().wait()  # after two renewals: wait until cancelled

    renewing = asyncio.create_task(keep_token_alive(own, floor=0.5, sleep=sleep))
    try:
        await eventually(lambda: len(asked) > 2, timeout=20, what="two renewals")
        assert len(renewals) == 2
        assert all(ttl is not None and ttl > 3500 for ttl in renewals)  # back to the period
        assert asked[:2] == [pytest.approx(1800, abs=30)] * 2  # at half the TTL
        assert await own.token_policies() == ["default"]

        await vault.revoke_accessor(accessor)

        with pytest.raises(SecretError):
            await own.token_ttl()
        assert await vault.token_ttl() is None  # root: never expires, nothing to renew
    finally:
        renewing.cancel()
        await own.close()
