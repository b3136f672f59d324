"""The control plane as a token issuer: short-lived ES256 JWTs that let an API principal
call one agent through its public entry.

One P-256 signing key, kept in Vault KV at :data:`SIGNING_KEY_REF` (the control plane's own
tree, outside every agent's ``specmesh/agents/<agent>/``, which agents' policies read; a
secrets-admin can neither overwrite nor share it through the API). The first replica that
finds no key creates it with check-and-set 0, so replicas starting together agree on one
key: a replica whose write lost reads the winner's. The public half is served as a JWK Set
(``GET /.well-known/jwks.json``, no auth); its ``kid`` is the key's RFC 7638 thumbprint.

A token (:meth:`TokenIssuer.mint`) carries ``iss`` (``SPECMESH_TOKEN_ISSUER``, default
``specmesh``), ``sub`` (the API principal's name), ``aud`` (the agent's resource name),
``iat``, ``exp`` (``iat`` + ``SPECMESH_INVOKE_TOKEN_TTL_SECONDS``, default 300 s) and a
random ``jti``; its header names the ``kid``. A sidecar that trusts this issuer (its
``SPECMESH_JWT_ISSUERS`` entry with ``audiences: ["{agent}"]``) turns it into the request
principal ``<iss>/<sub>``. The token itself is never logged or stored.

The analysis loop's evaluation tokens also carry ``specmesh_track`` (:data:`TRACK_CLAIM`,
``"canary"``): an entry honours it only in tokens of the issuer it trusts as the control
plane's (``controlPlane: true`` in ``SPECMESH_JWT_ISSUERS``) and sends the call to that
track; the API never mints one.

The principal's name must be a usable subject (:data:`SUBJECT_RULE`: no ``/``, ``*``,
whitespace or control characters, at most 128 characters): ``<iss>/<sub>`` has to name one
principal unambiguously in the agents' ``callers.principals`` and as a task owner.
API token names are free text, so :func:`subject_problem` is checked at mint time (the API
answers 400). Two API tokens with the same name are one principal: the principal is the name.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from specmesh.callers import TRACK_CLAIM
from specmesh.errors import SecretError, SecretNotFoundError
from specmesh.secrets import VaultRef
from specmesh.vault import CONTROL_PLANE_TREE, VaultClient

__all__ = [
    "ALGORITHM",
    "CONTROL_PLANE_TREE",
    "DEFAULT_ISSUER",
    "DEFAULT_TTL_SECONDS",
    "MAX_TTL_SECONDS",
    "SIGNING_KEY_PATH",
    "SUBJECT_RULE",
    "TRACK_CLAIM",
    "InvokeToken",
    "TokenIssuer",
    "key_id",
    "subject_problem",
]

logger = logging.getLogger(__name__)

ALGORITHM = "ES256"
DEFAULT_ISSUER = "specmesh"
SUBJECT_RULE = r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}$"
"""What a token's ``sub`` (the API principal's name) must match."""
_SUBJECT = re.compile(SUBJECT_RULE.removeprefix("^").removesuffix("$"))
DEFAULT_TTL_SECONDS = 300
MAX_TTL_SECONDS = 3600
SIGNING_KEY_PATH = f"{CONTROL_PLANE_TREE}/token-issuer"
"""KV path of the signing key (field ``privateKeyPem``: PKCS#8 PEM of a P-256 key)."""
_FIELD = "privateKeyPem"


@dataclass(frozen=True)
class InvokeToken:
    """A minted token and what it says (``to_json`` is the API's answer)."""

    token: str
    issuer: str
    subject: str
    audience: str
    expires_at: datetime
    jti: str

    def to_json(self) -> dict[str, Any]:
        return {
            "token": self.token,
            "expiresAt": self.expires_at.isoformat(),
            "issuer": self.issuer,
            "subject": self.subject,
            "audience": self.audience,
        }


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def key_id(public_jwk: dict[str, Any]) -> str:
    """RFC 7638 thumbprint (SHA-256) of an EC public JWK: stable for one key, on every
    replica."""
    canonical = json.dumps(
        {k: public_jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"), sort_keys=True
    )
    return _b64(hashlib.sha256(canonical.encode()).digest())


def subject_problem(subject: str) -> str | None:
    """What makes ``subject`` unusable as a token's ``sub``, or ``None``. The message shows
    the name escaped and shortened (it may hold control characters)."""
    if _SUBJECT.fullmatch(subject):
        return None
    shown = repr(subject if len(subject) <= 40 else subject[:40] + "...")
    return (
        f"principal name {shown} is not a usable token subject: must match {SUBJECT_RULE} "
        "(letters, digits and . _ @ : - only; no '/', '*', whitespace or control characters; "
        "at most 128 characters)"
    )


class TokenIssuer:
    """Mints invoke tokens with the control plane's signing key (read from Vault, or created
    there once); see the module docstring."""

    def __init__(
        self,
        *,
        vault: VaultClient,
        kv_mount: str = "secret",
        key_path: str = SIGNING_KEY_PATH,
        issuer: str = DEFAULT_ISSUER,
        ttl_seconds: int = DEFAULT_TTL_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 1 <= ttl_seconds <= MAX_TTL_SECONDS:
            raise ValueError(
                f"invoke token TTL: must be 1 to {MAX_TTL_SECONDS} seconds (got {ttl_seconds})"
            )
        if not issuer:
            raise ValueError("token issuer: must not be empty")
        self._vault = vault
        self._ref = VaultRef.parse(f"vault://{kv_mount}/{key_path}#{_FIELD}")
        self.issuer = issuer
        self.ttl_seconds = ttl_seconds
        self._clock = clock
        self._lock = asyncio.Lock()
        self._key: ec.EllipticCurvePrivateKey | None = None
        self._jwk: dict[str, Any] | None = None

    @property
    def key_reference(self) -> str:
        """Where the signing key lives (a ``vault://`` reference, never the key)."""
        return str(self._ref)

    async def load(self) -> str:
        """Read the signing key from Vault, creating it first when there is none; return its
        ``kid``. Safe to call again (the key is read once per process)."""
        async with self._lock:
            if self._key is None:
                self._use(await self._read_or_create())
            assert self._jwk is not None
            return str(self._jwk["kid"])

    async def _read_or_create(self) -> str:
        try:
            return await self._vault.read(self._ref)
        except SecretNotFoundError:
            pass
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        if await self._vault.create(self._ref, pem):
            logger.info("created the invoke-token signing key at %s", self._ref.location)
            return pem
        logger.info("another replica created the signing key first; reading it")
        return await self._vault.read(self._ref)

    def _use(self, pem: str) -> None:
        try:
            key = serialization.load_pem_private_key(pem.encode(), password=None)
        except (ValueError, TypeError) as e:
            raise SecretError(f"{self._ref.location}: not a PEM private key") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise SecretError(f"{self._ref.location}: not a P-256 (ES256) key")
        public: dict[str, Any] = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
        jwk = {k: public[k] for k in ("kty", "crv", "x", "y")}
        self._key = key
        self._jwk = {**jwk, "kid": key_id(jwk), "use": "sig", "alg": ALGORITHM}

    async def jwks(self) -> dict[str, Any]:
        """The JWK Set of the public key(s) tokens are signed with."""
        await self.load()
        return {"keys": [dict(self._jwk or {})]}

    async def mint(
        self,
        *,
        subject: str,
        audience: str,
        track: Literal["stable", "canary"] | None = None,
        ttl_seconds: int | None = None,
    ) -> InvokeToken:
        """A token for ``subject`` to call the agent ``audience`` (its resource name);
        ``ValueError`` when ``subject`` is no usable subject (:func:`subject_problem`).

        ``track`` (the control plane's own release evaluation only, never an API caller's)
        adds the :data:`TRACK_CLAIM`: an entry that trusts this issuer as the control
        plane's sends the call to an instance of that track; ``ttl_seconds`` shortens the
        lifetime (at most the issuer's)."""
        problem = subject_problem(subject)
        if problem is not None:
            raise ValueError(problem)
        kid = await self.load()
        assert self._key is not None
        now = int(self._clock())
        ttl = min(ttl_seconds or self.ttl_seconds, self.ttl_seconds)
        jti = secrets.token_hex(16)
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": subject,
            "aud": audience,
            "iat": now,
            "exp": now + ttl,
            "jti": jti,
        }
        if track is not None:
            claims[TRACK_CLAIM] = track
        token = jwt.encode(claims, self._key, algorithm=ALGORITHM, headers={"kid": kid})
        return InvokeToken(
            token=token,
            issuer=self.issuer,
            subject=subject,
            audience=audience,
            expires_at=datetime.fromtimestamp(now + ttl, UTC),
            jti=jti,
        )
