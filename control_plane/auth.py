"""Authentication and authorization: bearer tokens, roles, deny by default.

An :class:`Authenticator` turns a request's ``Authorization`` header into a
:class:`Principal`; :class:`StaticTokenAuthenticator` reads a token file (tokens stored
as SHA-256 hashes). An OIDC authenticator can be added behind the same interface.

Every API action is named (``agents.write``...) and :data:`PERMISSIONS` lists the roles
that may do it; an action not in the table is denied to everyone.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
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
    "hash_token",
    "new_token",
]


class Role(StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"
    SECRETS_ADMIN = "secrets-admin"


_READ = frozenset({Role.VIEWER, Role.OPERATOR, Role.ADMIN})
_WRITE = frozenset({Role.OPERATOR, Role.ADMIN})

PERMISSIONS: dict[str, frozenset[Role]] = {
    "agents.read": _READ,
    "agents.write": _WRITE,
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


class StaticTokenAuthenticator:
    """Bearer tokens from a JSON file: ``{"tokens": [{"name", "roles", "sha256"}]}``."""

    def __init__(self, entries: dict[str, Principal]) -> None:
        self._by_hash = dict(entries)

    @classmethod
    def from_file(cls, path: Path) -> StaticTokenAuthenticator:
        data = json.loads(path.read_text())
        entries = {
            t["sha256"]: Principal(t["name"], frozenset(Role(r) for r in t["roles"]))
            for t in data["tokens"]
        }
        return cls(entries)

    @staticmethod
    def write_file(path: Path, tokens: dict[str, tuple[str, list[Role]]]) -> None:
        """Write a token file from ``token -> (name, roles)`` (only hashes are stored)."""
        data = {
            "tokens": [
                {"name": name, "roles": [str(r) for r in roles], "sha256": hash_token(token)}
                for token, (name, roles) in tokens.items()
            ]
        }
        path.write_text(json.dumps(data, indent=2))
        path.chmod(0o600)

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization or not authorization.lower().startswith("bearer "):
            raise UnauthenticatedError("missing bearer token (Authorization: Bearer <token>)")
        digest = hash_token(authorization[7:].strip())
        for known, principal in self._by_hash.items():
            if hmac.compare_digest(known, digest):
                return principal
        raise UnauthenticatedError("unknown bearer token")
