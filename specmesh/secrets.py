"""Secret references and the one redaction helper.

A secret-bearing spec field (``apiKey``, header and query-parameter values, store
credentials) holds either a reference ``vault://<mount>/<path>#<field>[@<version>]`` or, on
the way in only, a plaintext value that apply (:mod:`specmesh.spec_apply`) writes into Vault
KV v2 as a new version and replaces with a reference to exactly that version. Nothing
downstream of an apply -- etcd, the engine, logs, spans, error messages -- ever holds the
plaintext.

A versioned reference pins one KV v2 version: a revision names the exact keys it ran with,
and rollback restores them. An unversioned reference (hand-written, for a secret managed
elsewhere) reads the latest version.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from specmesh.errors import SecretReferenceError

__all__ = [
    "REDACTED",
    "VaultRef",
    "is_reference",
    "redact",
    "redact_text",
]

REDACTED = "<redacted>"
_SCHEME = "vault://"
_SEGMENT = re.compile(r"[A-Za-z0-9_.@=-]+")
"""A path segment: no ``/``, no Vault policy globs (``+``, ``*``), nothing to escape."""
_FIELD = re.compile(r"[A-Za-z0-9_.=+-]+")


@dataclass(frozen=True)
class VaultRef:
    """A parsed ``vault://<mount>/<path>#<field>[@<version>]`` reference to a KV v2 secret
    field, at one version or (``version`` None) the latest."""

    mount: str
    path: str
    field: str
    version: int | None = None

    @classmethod
    def parse(cls, value: str) -> VaultRef:
        """Parse a reference; raise :class:`SecretReferenceError` naming what is wrong."""
        if not value.startswith(_SCHEME):
            raise SecretReferenceError(reference=value, reason="must start with 'vault://'")
        rest = value[len(_SCHEME) :]
        location, sep, field = rest.partition("#")
        if not sep or not field:
            raise SecretReferenceError(reference=value, reason="missing '#<field>' after the path")
        version: int | None = None
        name, at, number = field.rpartition("@")
        if at:
            if not (number.isascii() and number.isdigit()) or not name:
                raise SecretReferenceError(
                    reference=value, reason=f"bad version {number!r} (expected #<field>@<n>)"
                )
            version = int(number)
            if not 1 <= version <= 2**31:
                raise SecretReferenceError(reference=value, reason=f"bad version {number!r}")
            field = name
        mount, slash, path = location.partition("/")
        if not mount or not slash or not path:
            raise SecretReferenceError(
                reference=value, reason="must be vault://<mount>/<path>#<field>"
            )
        for segment in path.split("/"):
            if not _SEGMENT.fullmatch(segment):
                raise SecretReferenceError(
                    reference=value,
                    reason=f"path segment {segment!r} is empty or holds characters "
                    "other than letters, digits and '_.@=-'",
                )
            if set(segment) == {"."}:
                # an HTTP client normalises `..` away: the path would leave its tree
                raise SecretReferenceError(
                    reference=value,
                    reason=f"path segment {segment!r} is not allowed ('.' and '..' could "
                    "walk out of the agent's own paths)",
                )
        if not _SEGMENT.fullmatch(mount) or set(mount) == {"."}:
            raise SecretReferenceError(reference=value, reason=f"bad mount {mount!r}")
        if not _FIELD.fullmatch(field):
            raise SecretReferenceError(reference=value, reason=f"bad field {field!r}")
        return cls(mount=mount, path=path, field=field, version=version)

    def __str__(self) -> str:
        at = f"@{self.version}" if self.version is not None else ""
        return f"{_SCHEME}{self.mount}/{self.path}#{self.field}{at}"

    @property
    def location(self) -> VaultRef:
        """The same field at no particular version (what a grant or a policy names)."""
        return VaultRef(mount=self.mount, path=self.path, field=self.field)

    def at(self, version: int) -> VaultRef:
        """This field at ``version``."""
        return VaultRef(mount=self.mount, path=self.path, field=self.field, version=version)


def is_reference(value: str) -> bool:
    """Whether ``value`` is meant as a reference (starts with ``vault://``)."""
    return value.startswith(_SCHEME)


def redact(value: Any, *, keys: Iterable[str] = ()) -> Any:
    """Return a copy of ``value`` safe to log, trace or show.

    Plain strings are masked unless they are ``vault://`` references (a reference is
    not a secret). In mappings, values under secret-bearing keys (``apiKey``,
    ``headers``, ``queryParams``, ``credentials``, ``token``, ``password``, plus
    ``keys``) are masked the same way; everything else is kept.
    """
    secret_keys = set(_SECRET_KEYS) | set(keys)
    return _redact(value, secret_keys, inside_secret=False)


_SECRET_KEYS = frozenset(
    {
        "apiKey",
        "api_key",
        "headers",
        "queryParams",
        "credentials",
        "token",
        "password",
        "secret",
        "authorization",
        "Authorization",
        "value",
    }
)


def _redact(value: Any, secret_keys: set[str], *, inside_secret: bool) -> Any:
    if isinstance(value, Mapping):
        return {
            k: _redact(v, secret_keys, inside_secret=inside_secret or k in secret_keys)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_redact(v, secret_keys, inside_secret=inside_secret) for v in value]
    if inside_secret and isinstance(value, str):
        return value if is_reference(value) else REDACTED
    return value


def redact_text(text: str, secrets: Iterable[str]) -> str:
    """Replace every occurrence of each known secret value in ``text``."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text
