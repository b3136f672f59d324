"""Async access to Vault (OpenBao) KV v2, policies and tokens, through hvac.

hvac is synchronous: every call runs on the client's thread pool. Errors of hvac and
requests are translated here into :mod:`specmesh.errors`; no message carries a
secret value.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import hvac
import requests
from hvac import exceptions as hvac_exc

from specmesh.errors import (
    SecretAccessDeniedError,
    SecretError,
    SecretNotFoundError,
    SecretUnavailableError,
)
from specmesh.names import resource_name
from specmesh.secrets import VaultRef

__all__ = [
    "VaultClient",
    "agent_policy",
    "agent_policy_name",
    "agent_secret_prefix",
    "kubernetes_login",
]

T = TypeVar("T")


def agent_secret_prefix(agent: str) -> str:
    """KV path (below the mount) under which apply stores an agent's secrets."""
    return f"specmesh/agents/{resource_name(agent)}"


def agent_policy_name(agent: str) -> str:
    return f"specmesh-agent-{resource_name(agent)}"


def agent_policy(agent: str, *, mount: str, extra_refs: list[VaultRef] | None = None) -> str:
    """HCL of the agent's policy: read its own paths (and the exact paths its spec
    references elsewhere), nothing else."""
    prefix = agent_secret_prefix(agent)
    rules = [
        f'path "{mount}/data/{prefix}/*" {{\n  capabilities = ["read"]\n}}',
        f'path "{mount}/metadata/{prefix}/*" {{\n  capabilities = ["read", "list"]\n}}',
    ]
    for ref in sorted({(r.mount, r.path) for r in extra_refs or []}):
        rules.append(f'path "{ref[0]}/data/{ref[1]}" {{\n  capabilities = ["read"]\n}}')
    return "\n".join(rules) + "\n"


class VaultClient:
    """One Vault identity (a token) at one address."""

    def __init__(self, *, address: str, token: str, timeout: float = 5.0) -> None:
        self.address = address
        self._client = hvac.Client(url=address, token=token, timeout=timeout)
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="vault")

    @property
    def token(self) -> str:
        """The identity's token (for a second client of the same identity)."""
        return str(self._client.token)

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self._client.adapter.close)

    async def _run(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._pool, functools.partial(self._translate, what, fn, *args, **kwargs)
        )

    def _translate(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except hvac_exc.Forbidden as e:
            raise SecretAccessDeniedError(path=what) from e
        except hvac_exc.InvalidPath as e:
            raise SecretNotFoundError(reference=what) from e
        except (hvac_exc.VaultDown, hvac_exc.BadGateway) as e:
            raise SecretUnavailableError(address=self.address, reason="sealed or down") from e
        except requests.RequestException as e:
            raise SecretUnavailableError(address=self.address, reason=type(e).__name__) from e
        except hvac_exc.VaultError as e:
            raise SecretError(f"Vault refused {what!r}: {type(e).__name__}") from e

    # ------------------------------------------------------------ KV v2

    async def read(self, ref: VaultRef) -> str:
        """The value a reference points at."""
        response = await self._run(
            str(ref),
            self._client.secrets.kv.v2.read_secret_version,
            path=ref.path,
            mount_point=ref.mount,
            raise_on_deleted_version=True,
        )
        data = response["data"]["data"] or {}
        if ref.field not in data:
            raise SecretNotFoundError(reference=str(ref))
        return str(data[ref.field])

    async def write(self, ref: VaultRef, value: str) -> bool:
        """Store ``value`` at the reference (one secret per reference); return False when
        the current version already holds it."""
        try:
            if await self.read(ref) == value:
                return False
        except SecretNotFoundError:
            pass
        await self._run(
            str(ref),
            self._client.secrets.kv.v2.create_or_update_secret,
            path=ref.path,
            secret={ref.field: value},
            mount_point=ref.mount,
        )
        return True

    async def list_keys(self, *, mount: str, path: str) -> list[str]:
        """Names directly under ``path`` (folders end with ``/``); empty when none."""
        try:
            response = await self._run(
                f"{mount}/metadata/{path}",
                self._client.secrets.kv.v2.list_secrets,
                path=path,
                mount_point=mount,
            )
        except SecretNotFoundError:
            return []
        keys = _dig(response, "data", "keys")
        if not isinstance(keys, list):
            raise self._odd_answer(f"{mount}/metadata/{path}", "data.keys")
        return [str(k) for k in keys]

    async def read_fields(self, *, mount: str, path: str) -> tuple[list[str], int]:
        """Field names of a secret and its current version (never the values)."""
        response = await self._run(
            f"{mount}/data/{path}",
            self._client.secrets.kv.v2.read_secret_version,
            path=path,
            mount_point=mount,
            raise_on_deleted_version=True,
        )
        fields = _dig(response, "data", "data") or {}
        version = _dig(response, "data", "metadata", "version")
        if not isinstance(fields, dict) or not isinstance(version, int):
            raise self._odd_answer(f"{mount}/data/{path}", "data.data and data.metadata.version")
        return sorted(fields.keys()), version

    def _odd_answer(self, what: str, expected: str) -> SecretUnavailableError:
        """Vault answered, but not with what a KV v2 mount answers (the path is not one)."""
        return SecretUnavailableError(
            address=self.address, reason=f"its answer to {what!r} has no {expected}"
        )

    # ------------------------------------------------------------ policies and tokens

    async def put_policy(self, name: str, hcl: str) -> None:
        await self._run(
            f"sys/policies/acl/{name}",
            self._client.sys.create_or_update_policy,
            name=name,
            policy=hcl,
        )

    async def read_policy(self, name: str) -> str:
        response = await self._run(
            f"sys/policies/acl/{name}", self._client.sys.read_policy, name=name
        )
        return str(response["data"]["rules"])

    async def create_token(self, *, policies: list[str], ttl: str = "1h") -> str:
        """A child token holding only ``policies`` (not ``default``)."""
        response = await self._run(
            "auth/token/create",
            self._client.auth.token.create,
            policies=policies,
            ttl=ttl,
            no_default_policy=True,
        )
        return str(response["auth"]["client_token"])


async def kubernetes_login(
    *,
    address: str,
    role: str,
    mount: str = "kubernetes",
    jwt_path: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/token"),
    timeout: float = 5.0,
) -> VaultClient:
    """Vault's Kubernetes auth method: the pod's service-account JWT for a token of ``role``.

    Not exercised by the local tests (there is no cluster here).
    """

    def login() -> str:
        client = hvac.Client(url=address, timeout=timeout)
        try:
            jwt = jwt_path.read_text().strip()
            response = client.auth.kubernetes.login(role=role, jwt=jwt, mount_point=mount)
        finally:
            client.adapter.close()
        return str(response["auth"]["client_token"])

    try:
        token = await asyncio.wait_for(asyncio.to_thread(login), timeout * 2)
    except (hvac_exc.VaultError, requests.RequestException, OSError, TimeoutError) as e:
        raise SecretError(
            f"Vault Kubernetes login as role {role!r} failed: {type(e).__name__}"
        ) from e
    return VaultClient(address=address, token=token, timeout=timeout)


def _dig(value: Any, *keys: str) -> Any:
    """``value[k1][k2]...``, or ``None`` where a level is missing or not an object."""
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value
