"""Authentication and authorization: bearer tokens, roles, deny by default.

An :class:`Authenticator` turns a request's ``Authorization`` header into a
:class:`Principal`; :class:`StaticTokenAuthenticator` reads a token file (tokens stored
as SHA-256 hashes, each with an optional expiry);
:class:`control_plane.tokens.TokenAuthenticator` adds the tokens minted through the API and
the revocations, both kept in etcd. An OIDC authenticator can be added behind the same
interface.

Every API action is named (``agents.write``...) and :data:`PERMISSIONS` lists the roles
that may do it; an action not in the table is denied to everyone.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from control_plane.errors import PermissionDeniedError, UnauthenticatedError

__all__ = [
    "PERMISSIONS",
    "Authenticator",
    "Principal",
    "Role",
    "StaticTokenAuthenticator",
    "authorize",
    "bearer_digest",
    "check_not_expired",
    "hash_token",
    "new_token",
    "parse_time",
]


class Role(StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"
    SECRETS_ADMIN = "secrets-admin"
    INVOKER = "invoker"
    """May get invoke tokens for agents (``agents.invoke``) and nothing else."""


_READ = frozenset({Role.VIEWER, Role.OPERATOR, Role.ADMIN})
_WRITE = frozenset({Role.OPERATOR, Role.ADMIN})

PERMISSIONS: dict[str, frozenset[Role]] = {
    "agents.read": _READ,
    "agents.write": _WRITE,
    "agents.invoke": _WRITE | {Role.INVOKER},
    "prompts.read": _READ,
    "prompts.write": _WRITE,
    "mcp.read": _READ,
    "mcp.write": frozenset({Role.ADMIN}),
    "registry.read": _READ,
    "releases.read": _READ,
    "releases.write": _WRITE,
    "mesh.read": _READ,
    "audit.read": frozenset({Role.OPERATOR, Role.ADMIN, Role.SECRETS_ADMIN}),
    "traces.read": _READ,
    "credentials.list": frozenset({Role.SECRETS_ADMIN}),
    "credentials.write": frozenset({Role.SECRETS_ADMIN}),
    "grants.read": _READ | {Role.SECRETS_ADMIN},
    "grants.write": frozenset({Role.SECRETS_ADMIN}),
    "secrets.gc": frozenset({Role.SECRETS_ADMIN}),
    "tokens.read": frozenset({Role.SECRETS_ADMIN}),
    "tokens.write": frozenset({Role.SECRETS_ADMIN}),
}
"""Action -> roles allowed. Secret *values* are never readable, by anyone."""


@dataclass(frozen=True)
class Principal:
    """Who is calling."""

    name: str
    roles: frozenset[Role]

    def can(self, action: str) -> bool:
        return bool(self.roles & PERMISSIONS.get(action, frozenset()))


def authorize(principal: Principal, action: str) -> None:
    """Raise :class:`PermissionDeniedError` unless one of the principal's roles may do it."""
    if not principal.can(action):
        raise PermissionDeniedError(principal=principal.name, action=action)


class Authenticator(Protocol):
    def authenticate(self, authorization: str | None) -> Principal:
        """The principal behind an ``Authorization`` header; raise UnauthenticatedError."""
        ...


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "smt_" + secrets.token_urlsafe(32)


def bearer_digest(authorization: str | None) -> str:
    """The SHA-256 of the token of an ``Authorization: Bearer`` header."""
    if not authorization or not authorization.lower().startswith("bearer "):
        raise UnauthenticatedError("missing bearer token (Authorization: Bearer <token>)")
    return hash_token(authorization[7:].strip())


def parse_time(raw: str) -> datetime:
    """An ISO 8601 date-time (UTC when it names no zone); ValueError otherwise."""
    value = datetime.fromisoformat(raw)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def check_not_expired(expires_at: datetime | None, *, now: datetime | None = None) -> None:
    """Raise :class:`UnauthenticatedError` once ``expires_at`` has passed."""
    if expires_at is not None and (now or datetime.now(UTC)) >= expires_at:
        raise UnauthenticatedError(f"token expired at {expires_at.isoformat()}")


class StaticTokenAuthenticator:
    """Bearer tokens from a JSON file: ``{"tokens": [{"name", "roles", "sha256",
    "expiresAt"?}]}`` (``expiresAt``: ISO 8601; past it the token is refused)."""

    def __init__(
        self, entries: dict[str, Principal], *, expires: Mapping[str, datetime] | None = None
    ) -> None:
        self._by_hash = dict(entries)
        self._expires = dict(expires or {})

    @classmethod
    def from_file(cls, path: Path) -> StaticTokenAuthenticator:
        data = json.loads(path.read_text())
        entries: dict[str, Principal] = {}
        expires: dict[str, datetime] = {}
        for i, t in enumerate(data["tokens"]):
            entries[t["sha256"]] = Principal(t["name"], frozenset(Role(r) for r in t["roles"]))
            if t.get("expiresAt") is not None:
                try:
                    expires[t["sha256"]] = parse_time(str(t["expiresAt"]))
                except ValueError:
                    raise ValueError(
                        f"{path}: tokens[{i}].expiresAt: must be an ISO 8601 date-time "
                        f"(got {t['expiresAt']!r})"
                    ) from None
        return cls(entries, expires=expires)

    @staticmethod
    def write_file(
        path: Path,
        tokens: dict[str, tuple[str, list[Role]]],
        *,
        expires: Mapping[str, datetime] | None = None,
    ) -> None:
        """Write a token file from ``token -> (name, roles)`` and optional ``token ->
        expiry`` (only hashes are stored)."""
        entries: list[dict[str, object]] = []
        for token, (name, roles) in tokens.items():
            entry: dict[str, object] = {
                "name": name, "roles": [str(r) for r in roles], "sha256": hash_token(token)
            }  # fmt: skip
            if expires and token in expires:
                entry["expiresAt"] = expires[token].isoformat()
            entries.append(entry)
        path.write_text(json.dumps({"tokens": entries}, indent=2))
        path.chmod(0o600)

    def entries(self) -> dict[str, tuple[Principal, datetime | None]]:
        """sha256 -> (principal, expiry) of every token of the file."""
        return {h: (p, self._expires.get(h)) for h, p in self._by_hash.items()}

    def lookup(self, digest: str) -> tuple[Principal, datetime | None] | None:
        """The principal and expiry of the token whose SHA-256 is ``digest``, if known."""
        for known, principal in self._by_hash.items():
            if hmac.compare_digest(known, digest):
                return principal, self._expires.get(known)
        return None

    def authenticate(self, authorization: str | None) -> Principal:
        found = self.lookup(bearer_digest(authorization))
        if found is None:
            raise UnauthenticatedError("unknown bearer token")
        principal, expires_at = found
        check_not_expired(expires_at)
        return principal
