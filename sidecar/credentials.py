"""Credentials: ``vault://`` references resolved with the agent's own Vault identity.

* **Identity**: a :class:`VaultLogin` gives the :class:`~specmesh.vault.VaultClient` to read
  with. Locally that is a token (:class:`TokenLogin`); in a cluster the Kubernetes auth method
  (:class:`KubernetesLogin`: the pod's service-account JWT exchanged for a token).
* **Cache**: a value is served from memory for ``ttl`` seconds after it was read (KV v2 has no
  lease, so the TTL is a setting, default 300 s). A background task re-reads each value at
  ``refresh_fraction`` (2/3) of its TTL; while Vault is unreachable the cached value keeps
  serving until its TTL ends, then :meth:`CredentialResolver.resolve` raises
  :class:`CredentialUnavailableError` (naming the reference, never the value).
* **Rotation**: a value rotated in Vault is picked up by the next refresh, or at once after
  :meth:`CredentialResolver.invalidate`.

Every value read is registered with :func:`specmesh.logs.register_secret`, so it is masked in
any log line.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol

from specmesh.aio import cancel_and_wait, wait_event
from specmesh.backoff import BackoffPolicy, Reconnect
from specmesh.errors import (
    SecretAccessDeniedError,
    SecretError,
    SecretNotFoundError,
    SecretReferenceError,
)
from specmesh.logs import register_secret
from specmesh.secrets import VaultRef, is_reference
from specmesh.vault import VaultClient, kubernetes_login

__all__ = [
    "CredentialResolver",
    "CredentialUnavailableError",
    "KubernetesLogin",
    "SecretSource",
    "TokenLogin",
    "VaultLogin",
]

logger = logging.getLogger(__name__)


class CredentialUnavailableError(SecretError):
    """A reference cannot be resolved now (Vault unreachable past the cache TTL, denied,
    missing). Carries the reference and the reason, never a value."""

    def __init__(self, *, reference: str, reason: str) -> None:
        self.reference = reference
        self.reason = reason
        super().__init__(f"credential {reference!r} is unavailable: {reason}")


class SecretSource(Protocol):
    """Reads one reference (``VaultClient`` is one)."""

    async def read(self, ref: VaultRef) -> str: ...


class VaultLogin(Protocol):
    """How the sidecar gets its Vault identity."""

    async def login(self) -> VaultClient:
        """A client holding this agent's token."""
        ...


@dataclass(frozen=True)
class TokenLogin:
    """A token given in the settings (local runs)."""

    address: str
    token: str
    timeout: float = 5.0

    async def login(self) -> VaultClient:
        return VaultClient(address=self.address, token=self.token, timeout=self.timeout)


@dataclass(frozen=True)
class KubernetesLogin:
    """The Kubernetes auth method: the pod's service-account JWT for a token of ``role``.

    Not exercised by the local tests (no cluster here); the JWT/OIDC method would be one more
    class of the same shape.
    """

    address: str
    role: str
    mount: str = "kubernetes"
    jwt_path: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    timeout: float = 5.0

    async def login(self) -> VaultClient:
        return await kubernetes_login(
            address=self.address,
            role=self.role,
            mount=self.mount,
            jwt_path=self.jwt_path,
            timeout=self.timeout,
        )


@dataclass
class _Entry:
    value: str
    fetched_at: float


class CredentialResolver:
    """Resolves references through a :class:`SecretSource`, with a TTL cache refreshed in the
    background. Use as an async context manager (it owns the refresh task)."""

    def __init__(
        self,
        *,
        source: SecretSource,
        ttl: float = 300.0,
        refresh_fraction: float = 2 / 3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl <= 0 or not 0 < refresh_fraction <= 1:
            raise ValueError("ttl must be > 0 and refresh_fraction in (0, 1]")
        self._source = source
        self.ttl = ttl
        self.refresh_fraction = refresh_fraction
        self._clock = clock
        self._cache: dict[VaultRef, _Entry] = {}
        self._refs: dict[str, VaultRef] = {}
        """Parsed references by their text (a call resolves the same few again and again)."""
        self._inflight: dict[VaultRef, asyncio.Future[str]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.refreshes = 0
        """Successful background refreshes (for tests and metrics)."""
        self.refresh_failures = 0

    async def __aenter__(self) -> CredentialResolver:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._refresh_loop(), name="credential-refresh")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    # ------------------------------------------------------------ API

    async def resolve(self, value: str) -> str:
        """The secret a ``vault://`` reference points at; a non-reference is returned as is."""
        if not is_reference(value):
            return value
        ref = self._refs.get(value)
        if ref is None:
            try:
                ref = VaultRef.parse(value)
            except SecretReferenceError as e:
                raise CredentialUnavailableError(reference=value, reason=e.reason) from e
            if len(self._refs) < 4096:  # references come from specs: few
                self._refs[value] = ref
        entry = self._cache.get(ref)
        now = self._clock()
        if entry is not None and now - entry.fetched_at < self.ttl:
            return entry.value
        return await self._fetch(ref)

    def invalidate(self, reference: str | None = None) -> None:
        """Forget one cached value (or all): the next use reads Vault again."""
        if reference is None:
            self._cache.clear()
        else:
            self._cache.pop(VaultRef.parse(reference), None)

    def expires_in(self, reference: str) -> float | None:
        """Seconds the cached value of ``reference`` may still serve (None if not cached)."""
        entry = self._cache.get(VaultRef.parse(reference))
        if entry is None:
            return None
        return entry.fetched_at + self.ttl - self._clock()

    # ------------------------------------------------------------ internals

    async def _fetch(self, ref: VaultRef) -> str:
        """Read ``ref`` once (concurrent callers share one read)."""
        pending = self._inflight.get(ref)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._inflight[ref] = future
        try:
            value = await self._read(ref)
        except CredentialUnavailableError as e:
            future.set_exception(e)
            future.exception()  # mark retrieved: sharing callers re-raise it themselves
            raise
        finally:
            self._inflight.pop(ref, None)
        future.set_result(value)
        return value

    async def _read(self, ref: VaultRef) -> str:
        try:
            value = await self._source.read(ref)
        except SecretError as e:
            if isinstance(e, SecretAccessDeniedError | SecretNotFoundError):
                # Vault's answer, not its absence: a revoked grant or a destroyed key stops
                # being served at once
                self._cache.pop(ref, None)
            entry = self._cache.get(ref)
            if entry is not None and self._clock() - entry.fetched_at < self.ttl:
                logger.warning("refreshing %s failed (%s); serving the cached value", ref, e)
                return entry.value
            reason = "not found in Vault" if isinstance(e, SecretNotFoundError) else str(e)
            logger.error("credential %s unavailable: %s", ref, reason)
            raise CredentialUnavailableError(reference=str(ref), reason=reason) from e
        register_secret(value)
        self._cache[ref] = _Entry(value=value, fetched_at=self._clock())
        self._wake.set()
        return value

    def _next_due(self) -> float | None:
        if not self._cache:
            return None
        lead = self.ttl * self.refresh_fraction
        return min(e.fetched_at for e in self._cache.values()) + lead

    async def _refresh_loop(self) -> None:
        lead = self.ttl * self.refresh_fraction
        cap = max(min(self.ttl / 10, 5.0), 0.05)
        retry = Reconnect(BackoffPolicy(initial=min(0.05, cap), maximum=cap, jitter=0.0))
        while True:
            due = self._next_due()
            self._wake.clear()
            if due is None:
                await self._wake.wait()
                continue
            delay = due - self._clock()
            if delay > 0:
                await wait_event(self._wake, delay)
                continue
            now = self._clock()
            failed = False
            for ref, entry in list(self._cache.items()):
                if now - entry.fetched_at < lead:
                    continue
                try:
                    value = await self._source.read(ref)
                except SecretError as e:
                    failed = True
                    self.refresh_failures += 1
                    logger.warning("background refresh of %s failed: %s", ref, e)
                    continue
                except asyncio.CancelledError:
                    raise
                except Exception:
                    failed = True
                    self.refresh_failures += 1
                    logger.exception("background refresh of %s failed", ref)
                    continue
                register_secret(value)
                self._cache[ref] = _Entry(value=value, fetched_at=self._clock())
                self.refreshes += 1
            if failed:
                # Entries still due: try again soon, not in a busy loop.
                await retry.wait(stop=self._wake)
            else:
                retry.reset()
