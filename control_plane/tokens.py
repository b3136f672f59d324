"""API tokens with an expiry and a revocation list, kept in etcd, effective without a restart.

Keys (:class:`specmesh.keys.Keys`)::

    <prefix>/tokens/records/<id>       {id, name, roles, sha256, createdAt, expiresAt, createdBy}
    <prefix>/tokens/revoked/<sha256>   {id, name, revokedAt, revokedBy}

A record holds the SHA-256 of the secret, never the secret: the secret is shown once, in
the answer that mints it. A token's id is the first 12 hex digits of that SHA-256, so each
entry of the token file (``SPECMESH_TOKENS_FILE``) has an id too, and a revocation keyed by
the SHA-256 refuses a token whether it was minted through the API or is in the file.

:class:`TokenAuthenticator` accepts the file's tokens and the API's, and refuses an expired
(``token expired at ...``) or revoked (``token revoked at ...``) one with 401. It keeps the
records and revocations in memory, fed by a watch on ``<prefix>/tokens/``
(:class:`specmesh.watch.PrefixWatcher`): a token minted or revoked on any control-plane
replica takes effect there within the watch's latency, with no restart; the replica that
wrote it applies it at once. Until it has read etcd once it refuses every token with 503
(fail closed: a revoked file token must not pass while the revocations are unknown).

:class:`TokenStore` mints, lists and revokes; each change is written with its audit entry
in one etcd transaction. Who may do what:

- only ``secrets-admin`` holds ``tokens.read`` (list) and ``tokens.write`` (mint, revoke);
- a token may not allow more than its creator may: every permission of the roles asked
  must be one the creator holds (:func:`check_grant`). The local fleet's admin token
  (``admin`` + ``secrets-admin``) may mint viewer, operator, admin and secrets-admin
  tokens; a ``secrets-admin`` alone only ``secrets-admin`` ones;
- a secrets-admin may revoke any token, a file token included;
- a token lives ``ttlSeconds`` (1 s to 90 days; 30 days by default).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from control_plane.auth import (
    PERMISSIONS,
    Principal,
    Role,
    StaticTokenAuthenticator,
    bearer_digest,
    check_not_expired,
    hash_token,
    new_token,
    parse_time,
)
from control_plane.errors import BadRequestError, PermissionDeniedError, UnauthenticatedError
from specmesh.aio import cancel_and_wait
from specmesh.errors import ConflictError, NotFoundError, StoreUnavailableError
from specmesh.etcd import Compare, EtcdClient, Op
from specmesh.keys import Keys
from specmesh.store import SpecStore, dumps
from specmesh.watch import PrefixWatcher

__all__ = [
    "DEFAULT_TTL_SECONDS",
    "MAX_TTL_SECONDS",
    "TokenAuthenticator",
    "TokenRecord",
    "TokenRequest",
    "TokenStore",
    "check_grant",
    "token_id",
]

logger = logging.getLogger(__name__)

DEFAULT_TTL_SECONDS = 30 * 24 * 3600
MAX_TTL_SECONDS = 90 * 24 * 3600
_ID = re.compile(r"^[0-9a-f]{12}$")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

Clock = Callable[[], datetime]


def _utcnow() -> datetime:
    return datetime.now(UTC)


def token_id(sha256: str) -> str:
    """The public id of a token: the first 12 hex digits of its SHA-256."""
    return sha256[:12]


class TokenRequest(BaseModel):
    """What ``POST /api/v1/tokens`` asks for."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[^\x00-\x1f\x7f]+$")]
    """Who or what the token is for (the actor its changes are audited under)."""
    roles: Annotated[list[Role], Field(min_length=1, max_length=len(Role))]
    """The token's roles; they may not allow more than its creator may."""
    ttl_seconds: Annotated[int, Field(alias="ttlSeconds", ge=1, le=MAX_TTL_SECONDS)] = (
        DEFAULT_TTL_SECONDS
    )
    """Seconds until the token expires (at most 90 days; 30 days by default)."""


@dataclass(frozen=True)
class TokenRecord:
    """A token as listed: never its secret."""

    id: str
    name: str
    roles: tuple[Role, ...]
    sha256: str
    source: Literal["api", "file"]
    expires_at: datetime | None
    created_at: datetime | None = None
    created_by: str | None = None
    revoked_at: datetime | None = None
    revoked_by: str | None = None

    def state(self, now: datetime) -> Literal["active", "expired", "revoked"]:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"

    def to_json(self, now: datetime) -> dict[str, Any]:
        """The public view (no SHA-256 either)."""

        def iso(t: datetime | None) -> str | None:
            return t.isoformat() if t else None

        return {
            "id": self.id,
            "name": self.name,
            "roles": [str(r) for r in self.roles],
            "source": self.source,
            "createdAt": iso(self.created_at),
            "createdBy": self.created_by,
            "expiresAt": iso(self.expires_at),
            "revokedAt": iso(self.revoked_at),
            "revokedBy": self.revoked_by,
            "state": self.state(now),
        }

    def stored(self) -> dict[str, Any]:
        """What etcd keeps at ``<prefix>/tokens/records/<id>``."""
        assert self.created_at is not None and self.expires_at is not None
        return {
            "id": self.id,
            "name": self.name,
            "roles": [str(r) for r in self.roles],
            "sha256": self.sha256,
            "createdAt": self.created_at.isoformat(),
            "createdBy": self.created_by,
            "expiresAt": self.expires_at.isoformat(),
        }

    @classmethod
    def from_stored(cls, data: dict[str, Any]) -> TokenRecord:
        return cls(
            id=str(data["id"]),
            name=str(data["name"]),
            roles=tuple(Role(r) for r in data["roles"]),
            sha256=str(data["sha256"]),
            source="api",
            created_at=parse_time(data["createdAt"]),
            created_by=data.get("createdBy"),
            expires_at=parse_time(data["expiresAt"]),
        )

    def revoked(self, revocation: dict[str, Any] | None) -> TokenRecord:
        if revocation is None:
            return self
        return replace(
            self,
            revoked_at=parse_time(revocation["revokedAt"]),
            revoked_by=revocation.get("revokedBy"),
        )


def _permissions(roles: Iterable[Role]) -> set[str]:
    held = set(roles)
    return {action for action, allowed in PERMISSIONS.items() if held & allowed}


def check_grant(creator: Principal, roles: Iterable[Role]) -> None:
    """Refuse (403) a role that would let the token do something its creator may not."""
    mine = _permissions(creator.roles)
    for role in roles:
        beyond = sorted(_permissions([role]) - mine)
        if beyond:
            raise PermissionDeniedError(
                principal=creator.name,
                action=f"mint a token with role {role} (it allows {', '.join(beyond)})",
            )


def _file_record(sha256: str, principal: Principal, expires_at: datetime | None) -> TokenRecord:
    return TokenRecord(
        id=token_id(sha256),
        name=principal.name,
        roles=tuple(sorted(principal.roles)),
        sha256=sha256,
        source="file",
        expires_at=expires_at,
    )


# ---------------------------------------------------------------- store


class TokenStore:
    """Mint, list and revoke tokens in etcd (each change audited in its transaction).

    ``on_change(key, value or None)`` is told of every key this store writes, so the
    authenticator of this replica applies it before the watch brings it.
    """

    def __init__(
        self,
        *,
        store: SpecStore,
        static: StaticTokenAuthenticator | None = None,
        on_change: Callable[[str, bytes | None], None] | None = None,
        clock: Clock = _utcnow,
    ) -> None:
        self._store = store
        self._etcd = store.etcd
        self._keys = store.keys
        self._static = static or StaticTokenAuthenticator({})
        self._on_change = on_change
        self._clock = clock

    def now(self) -> datetime:
        return self._clock()

    async def create(self, request: TokenRequest, *, actor: str) -> tuple[str, TokenRecord]:
        """A new token: its secret (shown only here) and its record."""
        now = self._clock()
        secret = new_token()
        sha256 = hash_token(secret)
        record = TokenRecord(
            id=token_id(sha256),
            name=request.name,
            roles=tuple(sorted(set(request.roles))),
            sha256=sha256,
            source="api",
            created_at=now,
            created_by=actor,
            expires_at=now + timedelta(seconds=request.ttl_seconds),
        )
        key = self._keys.token_record(record.id)
        value = dumps(record.stored())
        _, audit = self._store.audit_op(
            actor=actor,
            action="create",
            kind="Token",
            name=record.id,
            message=f"token {record.name!r} with roles {', '.join(record.roles)}, "
            f"expires at {record.stored()['expiresAt']}",
        )
        result = await self._etcd.txn(
            compare=[Compare(key, "CREATE", "EQUAL", 0)], success=[Op.put(key, value), audit]
        )
        if not result.succeeded:  # 48 bits of a random secret's hash collided
            raise ConflictError(kind="token", name=record.id, expected=None, actual=None)
        self._changed(key, value.encode())
        return secret, record

    async def list(self) -> list[TokenRecord]:
        """Every token (the file's and the API's), expired and revoked ones included."""
        records = await self._etcd.range(self._keys.token_records(), prefix=True)
        revoked = await self._revocations()
        out = [
            _file_record(sha, principal, expires).revoked(revoked.get(sha))
            for sha, (principal, expires) in self._static.entries().items()
        ]
        for kv in records.kvs:
            record = TokenRecord.from_stored(json.loads(kv.value))
            out.append(record.revoked(revoked.get(record.sha256)))
        return sorted(out, key=lambda r: (r.source, r.created_at or _EPOCH, r.id))

    async def revoke(self, token_id_: str, *, actor: str) -> TokenRecord:
        """Revoke a token (API or file) by id; revoking a revoked token changes nothing."""
        record = await self._find(token_id_)
        key = self._keys.token_revocation(record.sha256)
        revocation = {
            "id": record.id,
            "name": record.name,
            "revokedAt": self._clock().isoformat(),
            "revokedBy": actor,
        }
        value = dumps(revocation)
        _, audit = self._store.audit_op(
            actor=actor,
            action="revoke",
            kind="Token",
            name=record.id,
            message=f"token {record.name!r} ({record.source}) revoked",
        )
        result = await self._etcd.txn(
            compare=[Compare(key, "CREATE", "EQUAL", 0)], success=[Op.put(key, value), audit]
        )
        if result.succeeded:
            self._changed(key, value.encode())
            return record.revoked(revocation)
        existing = await self._etcd.get(key)
        return record.revoked(json.loads(existing.value) if existing else revocation)

    async def _find(self, token_id_: str) -> TokenRecord:
        if not _ID.fullmatch(token_id_):  # match's `$` would let "<id>\n" by
            raise BadRequestError(f"id: must be 12 lowercase hex digits (got {token_id_!r})")
        kv = await self._etcd.get(self._keys.token_record(token_id_))
        if kv is not None:
            return TokenRecord.from_stored(json.loads(kv.value))
        for sha, (principal, expires) in self._static.entries().items():
            if token_id(sha) == token_id_:
                return _file_record(sha, principal, expires)
        raise NotFoundError(kind="token", name=token_id_)

    async def _revocations(self) -> dict[str, dict[str, Any]]:
        result = await self._etcd.range(self._keys.token_revocations(), prefix=True)
        prefix = self._keys.token_revocations()
        return {kv.key[len(prefix) :]: json.loads(kv.value) for kv in result.kvs}

    def _changed(self, key: str, value: bytes | None) -> None:
        if self._on_change is not None:
            self._on_change(key, value)


# ---------------------------------------------------------------- authenticator


class TokenAuthenticator:
    """The token file's tokens and the API's, minus the expired and the revoked.

    An async context manager: entering starts the watch on ``<prefix>/tokens/``; leaving
    stops it. :meth:`authenticate` is synchronous (it reads the in-memory view).
    """

    def __init__(
        self,
        *,
        etcd: EtcdClient,
        keys: Keys,
        static: StaticTokenAuthenticator | None = None,
        clock: Clock = _utcnow,
    ) -> None:
        self._etcd = etcd
        self._keys = keys
        self.static = static or StaticTokenAuthenticator({})
        self._clock = clock
        self._records: dict[str, TokenRecord] = {}  # by sha256
        self._revoked: dict[str, str] = {}  # sha256 -> revokedAt
        self._loaded = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> TokenAuthenticator:
        self._task = asyncio.create_task(self._watch(), name="token-watch")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def wait_loaded(self, timeout: float) -> bool:
        """Whether etcd's tokens and revocations were read within ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self._loaded.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def authenticate(self, authorization: str | None) -> Principal:
        digest = bearer_digest(authorization)
        if not self._loaded.is_set():
            raise StoreUnavailableError(
                endpoint=self._etcd.endpoint, reason="the token revocation list is not loaded yet"
            )
        revoked_at = self._revoked.get(digest)
        if revoked_at is not None:
            raise UnauthenticatedError(f"token revoked at {revoked_at}")
        found = self.static.lookup(digest)
        if found is not None:
            principal, expires_at = found
            check_not_expired(expires_at, now=self._clock())
            return principal
        record = self._records.get(digest)
        if record is None:
            raise UnauthenticatedError("unknown bearer token")
        check_not_expired(record.expires_at, now=self._clock())
        return Principal(record.name, frozenset(record.roles))

    def observe(self, key: str, value: bytes | None) -> None:
        """Apply one key of ``<prefix>/tokens/`` (``None``: deleted)."""
        records, revocations = self._keys.token_records(), self._keys.token_revocations()
        try:
            if key.startswith(revocations):
                sha256 = key[len(revocations) :]
                if value is None:
                    self._revoked.pop(sha256, None)
                else:
                    self._revoked[sha256] = str(json.loads(value)["revokedAt"])
            elif key.startswith(records):
                if value is None:
                    self._records = {
                        s: r for s, r in self._records.items() if r.id != key[len(records) :]
                    }
                else:
                    record = TokenRecord.from_stored(json.loads(value))
                    self._records[record.sha256] = record
        except (ValueError, KeyError, TypeError) as e:
            logger.warning("ignoring the malformed token key %s: %s", key, e)

    async def _watch(self) -> None:
        watcher = PrefixWatcher(etcd=self._etcd, prefix=self._keys.tokens())
        try:
            async for update in watcher.updates():
                if update.snapshot is not None:
                    self._records.clear()
                    self._revoked.clear()
                    for key, kv in update.snapshot.items():
                        self.observe(key, kv.value)
                for event in update.events:
                    self.observe(event.key, event.value if event.type == "put" else None)
                self._loaded.set()
        except Exception:
            logger.exception("the token watch failed; refusing every token from now on")
            self._loaded.clear()
        finally:
            watcher.close()
