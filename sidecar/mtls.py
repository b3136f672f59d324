"""mTLS between sidecars: certificates from Vault's PKI engine, rotated in place.

* :func:`setup_pki` (used by the test fixtures and by ``specmesh up``) enables the PKI engine
  at a mount, creates a root CA once, and a role that issues certificates whose URI SAN is
  ``spiffe://specmesh.local/agent/<resource-name>`` (and nothing else).
* :class:`PkiClient` issues one certificate for an agent (hvac is synchronous: calls run in a
  thread).
* :class:`AgentCertificates` holds the agent's server and client :class:`ssl.SSLContext` and
  rotates the certificate at ``rotate_fraction`` (2/3) of its TTL by loading the new chain
  into the *same* contexts: new handshakes present the new certificate, established
  connections are untouched.

An agent's identity is the URI SAN of its certificate (:func:`spiffe_id`,
:func:`agent_from_cert`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import hvac

from specmesh.aio import cancel_and_wait
from specmesh.backoff import BackoffPolicy, Reconnect
from specmesh.errors import SecretError
from specmesh.names import resource_name
from specmesh.pki import (
    DEFAULT_PKI_MOUNT,
    DEFAULT_PKI_ROLE,
    TRUST_DOMAIN,
    agent_dns_name,
    setup_pki,
    spiffe_id,
)
from specmesh.vault import call_vault

__all__ = [
    "DEFAULT_PKI_MOUNT",
    "DEFAULT_PKI_ROLE",
    "TRUST_DOMAIN",
    "AgentCertificates",
    "IssuedCertificate",
    "PkiClient",
    "agent_dns_name",
    "agent_from_cert",
    "client_context",
    "load_certificate",
    "pki_issue_policy",
    "server_context",
    "setup_pki",
    "spiffe_id",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")

_SPIFFE_PREFIX = f"spiffe://{TRUST_DOMAIN}/agent/"


def agent_from_cert(peercert: dict[str, Any] | None) -> str | None:
    """The agent resource name in a peer certificate's URI SAN (``ssl.getpeercert()``)."""
    if not peercert:
        return None
    for kind, value in peercert.get("subjectAltName", ()):
        if kind == "URI" and isinstance(value, str) and value.startswith(_SPIFFE_PREFIX):
            name = value[len(_SPIFFE_PREFIX) :]
            if name and "/" not in name:
                return name
    return None


def pki_issue_policy(*, mount: str = DEFAULT_PKI_MOUNT, role: str = DEFAULT_PKI_ROLE) -> str:
    """HCL letting a token issue certificates from the agents' role.

    The role allows any agent's SPIFFE URI SAN, so this does not yet bind a token to its own
    identity (a per-agent role would)."""
    return f'path "{mount}/issue/{role}" {{\n  capabilities = ["create", "update"]\n}}\n'


@dataclass(frozen=True)
class IssuedCertificate:
    """One certificate with its key and the CA chain (PEM)."""

    certificate: str
    private_key: str
    ca_chain: str
    serial: str
    """Serial as Vault prints it (``xx:xx:...``)."""
    not_after: datetime
    uri: str

    @property
    def serial_int(self) -> int:
        return int(self.serial.replace(":", ""), 16)


class PkiClient:
    """Vault's PKI engine at ``mount``, with one identity (a token)."""

    def __init__(
        self,
        *,
        address: str,
        token: str,
        mount: str = DEFAULT_PKI_MOUNT,
        role: str = DEFAULT_PKI_ROLE,
        timeout: float = 10.0,
    ) -> None:
        self.address = address
        self.mount = mount
        self.role = role
        self._client = hvac.Client(url=address, token=token, timeout=timeout)

    async def close(self) -> None:
        await asyncio.to_thread(self._client.adapter.close)

    async def _run(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        def call() -> T:
            return call_vault(
                self.address, what, fn, *args, missing=False, refused="Vault PKI", **kwargs
            )

        return await asyncio.to_thread(call)

    async def ca_pem(self) -> str:
        """The CA certificate (PEM)."""

        pem = await self._run(
            f"{self.mount}/ca/pem",
            self._client.secrets.pki.read_ca_certificate,
            mount_point=self.mount,
        )
        return str(pem)

    async def issue(self, agent: str, *, ttl: float) -> IssuedCertificate:
        """A fresh certificate for ``agent`` valid ``ttl`` seconds."""
        rn = resource_name(agent)
        uri = spiffe_id(rn)
        response = await self._run(
            f"{self.mount}/issue/{self.role}",
            self._client.secrets.pki.generate_certificate,
            name=self.role,
            common_name=agent_dns_name(rn),
            extra_params={
                "uri_sans": uri,
                "alt_names": agent_dns_name(rn),
                "ttl": f"{max(1, round(ttl))}s",
                "exclude_cn_from_sans": True,
            },
            mount_point=self.mount,
        )
        data = response["data"]
        chain = data.get("ca_chain") or [data["issuing_ca"]]
        return IssuedCertificate(
            certificate=data["certificate"],
            private_key=data["private_key"],
            ca_chain="\n".join(chain),
            serial=data["serial_number"],
            not_after=datetime.fromtimestamp(int(data["expiration"]), UTC),
            uri=uri,
        )


def load_certificate(context: ssl.SSLContext, cert: IssuedCertificate) -> None:
    """Load a certificate and key into ``context`` (through a private temporary folder:
    ``ssl`` only loads from files); the files are removed at once."""
    with tempfile.TemporaryDirectory(prefix="specmesh-cert-") as folder:
        os.chmod(folder, 0o700)
        cert_file = Path(folder) / "cert.pem"
        key_file = Path(folder) / "key.pem"
        cert_file.write_text(cert.certificate + "\n" + cert.ca_chain + "\n")
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(cert.private_key)
        context.load_cert_chain(cert_file, key_file)


def server_context(ca_pem: str) -> ssl.SSLContext:
    """A server context that requires a client certificate signed by ``ca_pem``."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cadata=ca_pem)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def client_context(ca_pem: str) -> ssl.SSLContext:
    """A client context trusting ``ca_pem``. Instances are addressed by IP: callers pass
    ``server_hostname=agent_dns_name(partner)`` so the handshake checks the partner's
    identity."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca_pem)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class AgentCertificates:
    """The agent's certificate in a server and a client context, rotated in place.

    Use as an async context manager: it issues the first certificate and starts the rotation
    task (at ``rotate_fraction`` of the TTL; on failure it retries every few seconds while the
    current certificate is still valid).
    """

    def __init__(
        self,
        *,
        agent: str,
        pki: PkiClient,
        ttl: float = 300.0,
        rotate_fraction: float = 2 / 3,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """``sleep`` waits between rotations (a test injects its own clock here)."""
        self.agent = resource_name(agent)
        self._sleep = sleep
        self._pki = pki
        self.ttl = ttl
        self.rotate_fraction = rotate_fraction
        self.ca_pem = ""
        self._server: ssl.SSLContext | None = None
        self._client: ssl.SSLContext | None = None
        self._current: IssuedCertificate | None = None
        self._task: asyncio.Task[None] | None = None
        self.rotations = 0
        self.rotated = asyncio.Event()

    async def __aenter__(self) -> AgentCertificates:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        self.ca_pem = await self._pki.ca_pem()
        self._server = server_context(self.ca_pem)
        self._client = client_context(self.ca_pem)
        await self.rotate()
        self._task = asyncio.create_task(self._rotate_loop(), name=f"cert-rotation-{self.agent}")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    @property
    def server_context(self) -> ssl.SSLContext:
        assert self._server is not None, "start() first"
        return self._server

    @property
    def client_context(self) -> ssl.SSLContext:
        assert self._client is not None, "start() first"
        return self._client

    @property
    def current(self) -> IssuedCertificate:
        assert self._current is not None, "start() first"
        return self._current

    async def rotate(self) -> IssuedCertificate:
        """Issue a new certificate and load it into both contexts."""
        cert = await self._pki.issue(self.agent, ttl=self.ttl)
        await asyncio.to_thread(load_certificate, self.server_context, cert)
        await asyncio.to_thread(load_certificate, self.client_context, cert)
        previous = self._current
        self._current = cert
        if previous is not None:
            self.rotations += 1
            logger.info(
                "rotated the certificate of %s (serial %s -> %s)",
                self.agent,
                previous.serial,
                cert.serial,
            )
        self.rotated.set()
        return cert

    async def _rotate_loop(self) -> None:
        while True:
            issued_for = self.ttl * self.rotate_fraction
            await self._sleep(issued_for)
            cap = min(5.0, max(self.ttl / 10, 0.1))
            retry = Reconnect(BackoffPolicy(initial=min(0.1, cap), maximum=cap, jitter=0.05))
            while True:
                try:
                    await self.rotate()
                    break
                except SecretError as e:
                    left = self.current.not_after.timestamp() - time.time()
                    logger.error(
                        "certificate rotation of %s failed (%s); current one expires in %.0fs",
                        self.agent,
                        e,
                        left,
                    )
                    await retry.wait()
