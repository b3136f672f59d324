"""Vault's PKI engine for the agents' mTLS: one root CA and one role (a Vault admin task,
done by ``specmesh up`` locally and by the platform team in a cluster)."""

from __future__ import annotations

import asyncio

import hvac
import requests
from hvac import exceptions as hvac_exc

from specmesh.errors import SecretError
from specmesh.names import resource_name

__all__ = [
    "DEFAULT_PKI_MOUNT",
    "DEFAULT_PKI_ROLE",
    "TRUST_DOMAIN",
    "agent_dns_name",
    "agent_role_params",
    "setup_pki",
    "spiffe_id",
]

TRUST_DOMAIN = "specmesh.local"
DEFAULT_PKI_MOUNT = "specmesh-pki"
DEFAULT_PKI_ROLE = "specmesh-agent"
_SPIFFE_PREFIX = f"spiffe://{TRUST_DOMAIN}/agent/"
_AGENT_CERTIFICATE: dict[str, object] = {
    "enforce_hostnames": False,
    "allow_ip_sans": False,
    "server_flag": True,
    "client_flag": True,
    "key_type": "ec",
    "key_bits": 256,
    "no_store": True,
}
"""What every agent certificate is, whichever role issues it: an EC P-256 key for both ends
of an mTLS connection, no IP SANs, not kept by Vault."""


def spiffe_id(agent: str) -> str:
    """The URI SAN naming ``agent`` (by its resource name)."""
    return f"{_SPIFFE_PREFIX}{resource_name(agent)}"


def agent_dns_name(agent: str) -> str:
    """The DNS SAN each agent certificate also carries (``<resource-name>.agent.<trust
    domain>``): callers pass it as ``server_hostname`` so that OpenSSL checks the partner's
    identity during the handshake."""
    return f"{resource_name(agent)}.agent.{TRUST_DOMAIN}"


def agent_role_params(agent: str, *, max_ttl: str = "24h") -> dict[str, object]:
    """The agent's own PKI role: certificates for its SPIFFE ID and its DNS name (also the CN),
    and nothing else -- whoever holds the agent's Vault token cannot
    get a certificate naming another agent."""
    rn = resource_name(agent)
    return {
        "allowed_uri_sans": spiffe_id(rn),
        "allowed_domains": [agent_dns_name(rn)],
        "allow_bare_domains": True,
        "allow_subdomains": False,
        "allow_glob_domains": False,
        "allow_wildcard_certificates": False,
        "allow_any_name": False,
        "allow_localhost": False,
        **_AGENT_CERTIFICATE,
        "max_ttl": max_ttl,
    }


async def setup_pki(
    *,
    address: str,
    token: str,
    mount: str = DEFAULT_PKI_MOUNT,
    role: str = DEFAULT_PKI_ROLE,
    max_ttl: str = "87600h",
    cert_max_ttl: str = "24h",
) -> str:
    """Enable PKI at ``mount`` (idempotent), create a root CA once and the agents' role;
    return the CA certificate (PEM). Needs a token allowed to mount engines (root locally)."""
    client = hvac.Client(url=address, token=token, timeout=30)

    def setup() -> str:
        try:
            mounts = client.sys.list_mounted_secrets_engines()
            mounts = mounts.get("data", mounts)
            if f"{mount}/" not in mounts:
                client.sys.enable_secrets_engine(
                    backend_type="pki", path=mount, config={"max_lease_ttl": max_ttl}
                )
            try:
                ca = str(client.secrets.pki.read_ca_certificate(mount_point=mount) or "")
            except hvac_exc.VaultError:
                ca = ""
            if "BEGIN CERTIFICATE" not in ca:
                client.secrets.pki.generate_root(
                    type="internal",
                    common_name=f"{TRUST_DOMAIN} root CA",
                    extra_params={"ttl": max_ttl, "key_type": "ec", "key_bits": 256},
                    mount_point=mount,
                )
                ca = str(client.secrets.pki.read_ca_certificate(mount_point=mount))
            client.secrets.pki.create_or_update_role(
                role,
                extra_params={
                    "allowed_uri_sans": f"{_SPIFFE_PREFIX}*",
                    "allow_any_name": True,
                    **_AGENT_CERTIFICATE,
                    "max_ttl": cert_max_ttl,
                },
                mount_point=mount,
            )
            return ca
        except (hvac_exc.VaultError, requests.RequestException) as e:
            raise SecretError(f"setting up Vault PKI at {mount!r} failed: {e}") from e
        finally:
            client.adapter.close()

    return await asyncio.to_thread(setup)
