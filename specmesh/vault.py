"""Async access to Vault (OpenBao) KV v2, policies and tokens, through hvac.

hvac is synchronous: every call runs on the client's thread pool. Errors of hvac and
requests are translated here into :mod:`specmesh.errors`; no message carries a
secret value.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import hvac
import requests
from hvac import exceptions as hvac_exc

from specmesh.backoff import BackoffPolicy, Reconnect
from specmesh.errors import (
    SecretAccessDeniedError,
    SecretError,
    SecretNotFoundError,
    SecretUnavailableError,
)
from specmesh.names import resource_name
from specmesh.secrets import VaultRef

__all__ = [
    "AGENTS_TREE",
    "AGENT_TOKEN_PERIOD",
    "AGENT_TOKEN_ROLE",
    "CONTROL_PLANE_POLICY",
    "CONTROL_PLANE_TREE",
    "INFRA_AGENT_SECRETS",
    "KEPT_VERSIONS",
    "SUPERVISOR_POLICY",
    "VaultClient",
    "agent_pki_role",
    "agent_policy",
    "agent_policy_name",
    "agent_secret_prefix",
    "agent_token_role_params",
    "call_vault",
    "control_plane_policy",
    "is_infra_agent_secret",
    "keep_token_alive",
    "kubernetes_login",
    "reserved_tree",
    "supervisor_policy",
]

T = TypeVar("T")
logger = logging.getLogger(__name__)

KEPT_VERSIONS = 1000
"""KV v2 versions kept per secret written by apply (KV's default keeps 10, which would drop
keys that old revisions still pin); unreferenced ones are destroyed by the spec service's
garbage collection."""


INFRA_AGENT_SECRETS: tuple[str, ...] = ("task-store",)
"""Paths in an agent's tree (relative to :func:`agent_secret_prefix`; each with whatever
lies below it) that infrastructure owns, not apply: no revision references them, and the
spec service's garbage collection never destroys their versions. ``task-store`` holds the
agent's own Redis password of the per-agent task-store mode (``taskStore.perAgentUser``,
docs/deploy.md 3.8), written by the operator. Apply never writes there: its paths start
with a spec field (``model``, ``tools``, ...), and no spec field is hyphenated."""


def agent_secret_prefix(agent: str) -> str:
    """KV path (below the mount) under which apply stores an agent's secrets."""
    return f"specmesh/agents/{resource_name(agent)}"


def is_infra_agent_secret(agent_tree: str, path: str) -> bool:
    """Whether ``path`` is at or below one of :data:`INFRA_AGENT_SECRETS` of the agent
    tree ``agent_tree`` (an :func:`agent_secret_prefix`)."""
    relative = path.removeprefix(agent_tree.rstrip("/") + "/")
    if relative == path:
        return False
    return any(relative == p or relative.startswith(p + "/") for p in INFRA_AGENT_SECRETS)


def agent_policy_name(agent: str) -> str:
    return f"specmesh-agent-{resource_name(agent)}"


def agent_pki_role(agent: str) -> str:
    """The agent's own Vault PKI role: it issues certificates for the agent's SPIFFE ID only."""
    return f"specmesh-agent-{resource_name(agent)}"


AGENTS_TREE = "specmesh/agents"
"""Where each agent's own secrets live (``<tree>/<rn>/...``)."""
CONTROL_PLANE_TREE = "specmesh/control-plane"
"""The control plane's own secrets (its token-signing key): never an agent's to read."""


def reserved_tree(path: str) -> str | None:
    """Why ``path`` (a KV path) may never be given to agents beyond their own tree, or
    ``None``: an agent's tree, or the control plane's."""
    for tree, what in (
        (AGENTS_TREE, "an agent's own tree"),
        (CONTROL_PLANE_TREE, "the control plane's own tree"),
    ):
        if path == tree or path.startswith(f"{tree}/"):
            return f"it lies in {what} ({tree}/)"
    return None


def agent_policy(
    agent: str,
    *,
    mount: str,
    shared: list[tuple[str, str]] | None = None,
    pki_mount: str | None = None,
    infrastructure: tuple[str, str] | None = None,
) -> str:
    """HCL of the agent's policy: read its own paths (any version), the secrets a
    secrets-admin shared with it (``shared``: exact ``(mount, path)`` pairs), the one
    infrastructure secret every agent's sidecar needs (``infrastructure``: the shared A2A
    task store's password, an exact ``(mount, path)``), and issue certificates from its own
    PKI role; nothing else."""
    prefix = agent_secret_prefix(agent)
    rules = [
        f'path "{mount}/data/{prefix}/*" {{\n  capabilities = ["read"]\n}}',
        f'path "{mount}/metadata/{prefix}/*" {{\n  capabilities = ["read", "list"]\n}}',
    ]
    for m, p in sorted(set(shared or [])):
        ref = VaultRef.parse(f"vault://{m}/{p}#_")  # raises on anything but a plain path
        reserved = reserved_tree(ref.path)
        if reserved:
            raise SecretError(f"refusing to share {m}/{p}: {reserved}")
        rules.append(f'path "{ref.mount}/data/{ref.path}" {{\n  capabilities = ["read"]\n}}')
    if infrastructure is not None:
        m, p = infrastructure
        ref = VaultRef.parse(f"vault://{m}/{p}#_")  # raises on anything but a plain path
        reserved = reserved_tree(ref.path)
        if reserved:
            raise SecretError(f"refusing {m}/{p} as the agents' infrastructure secret: {reserved}")
        rules.append(f'path "{ref.mount}/data/{ref.path}" {{\n  capabilities = ["read"]\n}}')
    if pki_mount:
        rules.append(
            f'path "{pki_mount}/issue/{agent_pki_role(agent)}" {{\n'
            '  capabilities = ["create", "update"]\n}'
        )
    return "\n".join(rules) + "\n"


CONTROL_PLANE_POLICY = "specmesh-control-plane"


def control_plane_policy(
    *,
    kv_mount: str = "secret",
    pki_mount: str | None = None,
    kubernetes_auth_mount: str | None = None,
    agent_role_prefix: str = "specmesh-agent-",
) -> str:
    """HCL of the control plane's own policy (what docs/deploy.md writes): agents' secrets
    under ``specmesh/`` (write new versions, read, list, destroy unreferenced versions), the
    agents' policies, when the sidecars do mTLS the agents' PKI roles and, on Kubernetes
    (``kubernetes_auth_mount``), the agents' Kubernetes-auth roles
    (``<agent_role_prefix>*``). No ``sys/`` beyond agent policies, no auth method's
    configuration, no root."""
    rules = [
        (f"{kv_mount}/data/specmesh/*", ["create", "update", "read"]),
        (f"{kv_mount}/metadata/specmesh", ["list"]),
        (f"{kv_mount}/metadata/specmesh/*", ["read", "list", "update", "delete"]),
        (f"{kv_mount}/destroy/specmesh/agents/*", ["update"]),
        ("sys/policies/acl/specmesh-agent-*", ["create", "update", "read", "delete"]),
        ("sys/policy/specmesh-agent-*", ["create", "update", "read", "delete"]),  # hvac's
    ]
    if pki_mount:
        rules.append(
            (f"{pki_mount}/roles/specmesh-agent-*", ["create", "update", "read", "delete"])
        )
    if kubernetes_auth_mount:
        rules.append(
            (
                f"auth/{kubernetes_auth_mount}/role/{agent_role_prefix}*",
                ["create", "update", "read", "delete"],
            )
        )
    return "".join(f'path "{p}" {{\n  capabilities = {json.dumps(c)}\n}}\n' for p, c in rules)


AGENT_TOKEN_ROLE = "specmesh-agent"
"""The token role the local supervisor mints agents' tokens from: orphan, periodic, and
holding only an agent's policy (``specmesh-agent-*``) besides ``default``."""
SUPERVISOR_POLICY = "specmesh-supervisor"
AGENT_TOKEN_PERIOD = "1h"
"""Period of an agent's token: its sidecar renews it; a dead sidecar's lapses within it."""


def agent_token_role_params() -> dict[str, object]:
    """Parameters of :data:`AGENT_TOKEN_ROLE` (written with the services' root token at
    set-up): tokens made from it can hold agent policies only, never the control plane's,
    the supervisor's or ``root``."""
    return {
        "allowed_policies_glob": ["specmesh-agent-*"],
        "disallowed_policies": ["root", CONTROL_PLANE_POLICY, SUPERVISOR_POLICY],
        "orphan": True,
        "renewable": True,
        "token_period": AGENT_TOKEN_PERIOD,
        "token_type": "service",
    }


def supervisor_policy() -> str:
    """HCL of the local supervisor's policy: mint agents' tokens from
    :data:`AGENT_TOKEN_ROLE`, nothing else (no secret, no policy, no revocation)."""
    return f'path "auth/token/create/{AGENT_TOKEN_ROLE}" {{\n  capabilities = ["update"]\n}}\n'


def call_vault(
    address: str,
    what: str,
    fn: Callable[..., T],
    *args: Any,
    missing: bool = True,
    refused: str = "Vault",
    **kwargs: Any,
) -> T:
    """``fn(*args, **kwargs)`` (an hvac call, blocking) with its errors as the project's:
    403 -> :class:`SecretAccessDeniedError`; an unknown path -> :class:`SecretNotFoundError`
    (``missing``; else a refusal); sealed, down or unreachable ->
    :class:`SecretUnavailableError`; any other refusal -> :class:`SecretError` naming
    ``what`` and the refusing engine (``refused``: "Vault", "Vault PKI")."""
    try:
        return fn(*args, **kwargs)
    except hvac_exc.Forbidden as e:
        raise SecretAccessDeniedError(path=what) from e
    except hvac_exc.InvalidPath as e:
        if missing:
            raise SecretNotFoundError(reference=what) from e
        raise SecretError(f"{refused} refused {what!r}: {e}") from e
    except (hvac_exc.VaultDown, hvac_exc.BadGateway) as e:
        raise SecretUnavailableError(address=address, reason="sealed or down") from e
    except requests.RequestException as e:
        raise SecretUnavailableError(address=address, reason=type(e).__name__) from e
    except hvac_exc.VaultError as e:
        detail = e if refused != "Vault" else type(e).__name__
        raise SecretError(f"{refused} refused {what!r}: {detail}") from e


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
        return call_vault(self.address, what, fn, *args, **kwargs)

    # ------------------------------------------------------------ KV v2

    async def read(self, ref: VaultRef) -> str:
        """The value a reference points at (its version, or the latest)."""
        value, _ = await self._read_versioned(ref)
        return value

    async def _read_versioned(self, ref: VaultRef) -> tuple[str, int]:
        response = await self._run(
            str(ref),
            self._client.secrets.kv.v2.read_secret_version,
            path=ref.path,
            version=ref.version,
            mount_point=ref.mount,
            raise_on_deleted_version=True,
        )
        data = (response.get("data") or {}).get("data") or {}
        if ref.field not in data:
            raise SecretNotFoundError(reference=str(ref))
        return str(data[ref.field]), int(response["data"]["metadata"]["version"])

    async def write_version(self, ref: VaultRef, value: str) -> VaultRef:
        """Store ``value`` as a new KV v2 version of the reference's secret (one field per
        secret) and return the reference pinned to that version. An existing version is
        never overwritten: a write that is never referenced (a refused or crashed apply)
        leaves only an unreferenced version behind, for :meth:`destroy_versions`."""
        location = ref.location
        response = await self._run(
            str(location),
            self._client.secrets.kv.v2.create_or_update_secret,
            path=ref.path,
            secret={ref.field: value},
            mount_point=ref.mount,
        )
        await self._run(
            str(location),
            self._client.secrets.kv.v2.update_metadata,
            path=ref.path,
            max_versions=KEPT_VERSIONS,
            mount_point=ref.mount,
        )
        return location.at(int(response["data"]["version"]))

    async def versions(self, *, mount: str, path: str) -> dict[int, dict[str, Any]]:
        """Version number -> ``{created_time, deletion_time, destroyed}`` of a secret."""
        response = await self._run(
            f"{mount}/metadata/{path}",
            self._client.secrets.kv.v2.read_secret_metadata,
            path=path,
            mount_point=mount,
        )
        raw = (response.get("data") or {}).get("versions") or {}
        return {int(k): dict(v) for k, v in raw.items()}

    async def destroy_versions(self, *, mount: str, path: str, versions: list[int]) -> None:
        """Destroy these versions of a secret for good (their data is gone)."""
        if versions:
            await self._run(
                f"{mount}/destroy/{path}",
                self._client.secrets.kv.v2.destroy_secret_versions,
                path=path,
                versions=sorted(versions),
                mount_point=mount,
            )

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

    async def create(self, ref: VaultRef, value: str) -> bool:
        """Store ``value`` as the first version of the reference's secret (check-and-set 0);
        False when the secret exists already (another writer came first: read theirs).
        Concurrent writers thus agree on one value."""

        def put() -> bool:
            try:
                self._client.secrets.kv.v2.create_or_update_secret(
                    path=ref.path, secret={ref.field: value}, cas=0, mount_point=ref.mount
                )
            except hvac_exc.InvalidRequest as e:
                if "check-and-set" in str(e):
                    return False
                raise
            return True

        return await self._run(str(ref.location), put)

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

    async def put_pki_role(self, *, mount: str, name: str, params: dict[str, object]) -> None:
        """Create or update a PKI role (``params``: e.g. :func:`specmesh.pki.agent_role_params`)."""
        await self._run(
            f"{mount}/roles/{name}",
            self._client.secrets.pki.create_or_update_role,
            name,
            extra_params=params,
            mount_point=mount,
        )

    async def delete_policy(self, name: str) -> None:
        await self._run(f"sys/policies/acl/{name}", self._client.sys.delete_policy, name=name)

    async def delete_pki_role(self, *, mount: str, name: str) -> None:
        await self._run(
            f"{mount}/roles/{name}",
            self._client.secrets.pki.delete_role,
            name,
            mount_point=mount,
        )

    async def put_kubernetes_role(
        self,
        *,
        mount: str,
        name: str,
        service_account: str,
        namespace: str,
        policies: list[str],
        ttl: str = "1h",
        audience: str | None = None,
    ) -> None:
        """Create or replace a Kubernetes-auth role: a token of ``service_account`` in
        ``namespace`` logs in for ``policies`` (an agent's sidecar, for its own policy)."""
        await self._run(
            f"auth/{mount}/role/{name}",
            self._client.auth.kubernetes.create_role,
            name,
            bound_service_account_names=[service_account],
            bound_service_account_namespaces=[namespace],
            policies=policies,
            ttl=ttl,
            audience=audience,
            mount_point=mount,
        )

    async def read_kubernetes_role(self, *, mount: str, name: str) -> dict[str, Any]:
        response = await self._run(
            f"auth/{mount}/role/{name}",
            self._client.auth.kubernetes.read_role,
            name,
            mount_point=mount,
        )
        return dict(response)

    async def delete_kubernetes_role(self, *, mount: str, name: str) -> None:
        """Delete a Kubernetes-auth role (none by that name: nothing to do)."""
        await self._run(
            f"auth/{mount}/role/{name}",
            self._client.auth.kubernetes.delete_role,
            name,
            mount_point=mount,
        )

    async def token_ttl(self) -> int | None:
        """Seconds this client's token has left; None when it never expires (root, a
        token without TTL)."""
        response = await self._run("auth/token/lookup-self", self._client.auth.token.lookup_self)
        data = response["data"]
        if not data.get("expire_time") and not data.get("ttl"):
            return None
        return int(data.get("ttl") or 0)

    async def revoke_self(self) -> None:
        """Revoke this client's token (it is useless afterwards)."""
        await self._run("auth/token/revoke-self", self._client.auth.token.revoke_self)

    async def renew_self(self) -> None:
        """Renew this client's token (its period, or its TTL up to the max)."""
        await self._run("auth/token/renew-self", self._client.auth.token.renew_self)

    async def create_identity_token(
        self, *, policies: list[str], period: str, display_name: str
    ) -> tuple[str, str]:
        """``(token, accessor)`` of an orphan, periodic token holding ``policies`` (and
        ``default``, for lookup/renew/revoke of itself): one process's own identity, renewed by
        it (:func:`keep_token_alive`) and revoked by accessor when it stops."""
        response = await self._run(
            "auth/token/create-orphan",
            self._client.auth.token.create_orphan,
            policies=policies,
            period=period,
            renewable=True,
            display_name=display_name,
        )
        auth = response["auth"]
        return str(auth["client_token"]), str(auth["accessor"])

    async def put_token_role(self, name: str, params: dict[str, object]) -> None:
        """Create or replace the token role ``name`` (set-up, with a root token)."""
        await self._run(
            f"auth/token/roles/{name}",
            self._client.write_data,
            f"auth/token/roles/{name}",
            data=params,
        )

    async def create_role_token(
        self, *, role: str, policies: list[str], display_name: str
    ) -> tuple[str, str]:
        """``(token, accessor)`` made from the token role ``role`` (its period, orphan and
        allowed policies apply; Vault refuses a policy the role does not allow)."""
        response = await self._run(
            f"auth/token/create/{role}",
            self._client.auth.token.create,
            role_name=role,
            policies=policies,
            display_name=display_name,
        )
        auth = response["auth"]
        return str(auth["client_token"]), str(auth["accessor"])

    async def revoke_accessor(self, accessor: str) -> None:
        """Revoke the token behind ``accessor`` (gone already: nothing to do)."""
        try:
            await self._run(
                "auth/token/revoke-accessor",
                self._client.auth.token.revoke_accessor,
                accessor=accessor,
            )
        except SecretError:
            logger.info("token accessor %s was already gone", accessor[:8])

    async def token_policies(self) -> list[str]:
        """Policies of this client's token."""
        response = await self._run("auth/token/lookup-self", self._client.auth.token.lookup_self)
        return sorted(response["data"].get("policies") or [])

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


async def keep_token_alive(
    vault: VaultClient,
    *,
    floor: float = 5.0,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Renew ``vault``'s token at half its remaining TTL, for as long as the task runs (a
    token that never expires -- root, a static token -- needs nothing). A failed renewal is
    logged and retried (backing off up to ``floor`` seconds); the caller's reads fail clearly
    once the token has expired. ``sleep`` waits between renewals (a test injects its own
    clock here)."""
    retry = Reconnect(BackoffPolicy(initial=min(0.5, floor), maximum=floor))
    while True:
        try:
            ttl = await vault.token_ttl()
            if ttl is None:
                return
            await sleep(min(max(floor, ttl / 2), max(ttl - 1, 0.1)))
            await vault.renew_self()
            retry.reset()
        except SecretError as e:
            delay = retry.next_delay()
            logger.warning("renewing the Vault token failed: %s (retrying in %.1f s)", e, delay)
            await retry.wait(delay)


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
