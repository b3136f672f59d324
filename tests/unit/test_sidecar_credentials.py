"""The sidecar's credential cache: it bridges Vault being away, never Vault saying no."""

from __future__ import annotations

import pytest

from sidecar.credentials import CredentialResolver, CredentialUnavailableError
from specmesh.errors import SecretAccessDeniedError, SecretError, SecretUnavailableError
from specmesh.secrets import VaultRef

REF = "vault://secret/specmesh/agents/a/model/apiKey#value@1"


class _Source:
    """An in-memory secret source whose next answer the test sets."""

    def __init__(self) -> None:
        self.answer: str | SecretError = "sk-value"

    async def read(self, ref: VaultRef) -> str:
        if isinstance(self.answer, SecretError):
            raise self.answer
        return self.answer


async def test_an_unreachable_vault_is_bridged_by_the_cache() -> None:
    source = _Source()
    resolver = CredentialResolver(source=source, ttl=60)
    assert await resolver.resolve(REF) == "sk-value"
    source.answer = SecretUnavailableError(address="http://vault", reason="down")

    assert await resolver._read(VaultRef.parse(REF)) == "sk-value"


@pytest.mark.parametrize("refusal", ["denied", "not found"])
async def test_a_refusal_from_vault_evicts_the_cached_value_at_once(refusal: str) -> None:
    from specmesh.errors import SecretNotFoundError

    source = _Source()
    resolver = CredentialResolver(source=source, ttl=60)
    assert await resolver.resolve(REF) == "sk-value"
    source.answer = (
        SecretAccessDeniedError(path=REF)
        if refusal == "denied"
        else SecretNotFoundError(reference=REF)
    )

    with pytest.raises(CredentialUnavailableError):
        await resolver._read(VaultRef.parse(REF))
    with pytest.raises(CredentialUnavailableError):
        await resolver.resolve(REF)  # and nothing is served from the cache afterwards
