"""The spec store: agents, prompts, MCP Registry entries and releases in etcd.

Every agent change is one etcd transaction -- the changed parts, a new immutable
revision bundle, the meta key and an audit entry -- guarded by the expected revision,
so a stale writer gets :class:`~specmesh.errors.ConflictError` and nothing is half
written. The agent revision *is* the etcd ``version`` of the agent's meta key: one
put per revision, compared atomically in the transaction.

The store refuses plaintext secrets: what it is given must already hold ``vault://``
references (see :mod:`specmesh.spec_apply`), so etcd never holds a secret.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets as _random
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from specmesh.errors import (
    ConflictError,
    NameCollisionError,
    NotFoundError,
    SpecError,
    SpecIssue,
)
from specmesh.etcd import Compare, EtcdClient, Op
from specmesh.keys import Keys
from specmesh.names import check_logical_name, resource_name
from specmesh.resolution import resolve, uses_mcp_server, uses_prompt, version_key
from specmesh.secrets import is_reference
from specmesh.spec.diff import Change, diff_json
from specmesh.spec.models import (
    PART_NAMES,
    AgentSpec,
    McpServerSpec,
    PromptEntry,
    PromptRelease,
    ReleaseSpec,
)
from specmesh.spec.secretpaths import iter_secrets
from specmesh.spec.validation import format_path, validate_model

__all__ = [
    "RELEASE_ACTIONS",
    "AgentRecord",
    "AgentSummary",
    "ApplyResult",
    "AuditEntry",
    "PromptHistory",
    "ReleaseState",
    "SpecStore",
    "dumps",
    "grant_id",
]


logger = logging.getLogger(__name__)


def dumps(value: Any) -> str:
    """Canonical JSON: sorted keys, no spaces."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _now() -> datetime:
    return datetime.now(UTC)


def grant_id(mount: str, path: str) -> str:
    """The key of the grant of one Vault secret (stable, path-safe)."""
    return hashlib.sha256(f"{mount}/{path}".encode()).hexdigest()[:20]


@dataclass(frozen=True)
class AgentRecord:
    """One revision of an agent."""

    name: str
    revision: int
    spec: dict[str, Any]
    created_at: str
    author: str
    action: str
    message: str = ""
    rolled_back_from: int | None = None
    resolved: dict[str, Any] | None = None
    """The prompt versions and MCP Registry entries the revision runs with (see
    :mod:`specmesh.resolution`); ``None`` on revisions written before they were recorded."""

    @property
    def resource_name(self) -> str:
        return resource_name(self.name)

    def spec_model(self) -> AgentSpec:
        return AgentSpec.model_validate(self.spec)

    def to_json(self) -> dict[str, Any]:
        return {
            "agent": self.name,
            "revision": self.revision,
            "createdAt": self.created_at,
            "author": self.author,
            "action": self.action,
            "message": self.message,
            "rolledBackFrom": self.rolled_back_from,
            "spec": self.spec,
            **({"resolved": self.resolved} if self.resolved is not None else {}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AgentRecord:
        return cls(
            name=data["agent"],
            revision=int(data["revision"]),
            spec=data["spec"],
            created_at=data["createdAt"],
            author=data["author"],
            action=data.get("action", "apply"),
            message=data.get("message", ""),
            rolled_back_from=data.get("rolledBackFrom"),
            resolved=data.get("resolved"),
        )


@dataclass(frozen=True)
class AgentSummary:
    name: str
    revision: int
    updated_at: str
    updated_by: str
    description: str

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "resourceName": resource_name(self.name),
            "revision": self.revision,
            "updatedAt": self.updated_at,
            "updatedBy": self.updated_by,
            "description": self.description,
        }


@dataclass(frozen=True)
class ApplyResult:
    """What an apply or rollback did."""

    agent: str
    revision: int
    previous_revision: int
    changed: bool
    changes: list[Change] = field(default_factory=list)
    audit_id: str | None = None
    etcd_revision: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "agent": self.agent,
            "revision": self.revision,
            "previousRevision": self.previous_revision,
            "changed": self.changed,
            "changes": [c.to_json() for c in self.changes],
            "auditId": self.audit_id,
        }


def _why(what: str, message: str) -> str:
    """A dependent revision's message: what changed, then the change's own message."""
    return f"{what}: {message}" if message else what


@dataclass(frozen=True)
class AuditEntry:
    id: str
    time: str
    actor: str
    action: str
    kind: str
    name: str
    revision: int | None
    previous_revision: int | None
    changes: list[dict[str, Any]]
    message: str = ""
    before: dict[str, Any] | None = None
    """The object as it was (a release's policy JSON); None when it did not exist or the
    entry does not record it (agents keep revisions instead)."""
    after: dict[str, Any] | None = None
    """The object as the change left it; None when deleted or not recorded."""
    details: dict[str, Any] | None = None
    """Why an automatic change was made (e.g. an auto-abort's gate figures)."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "time": self.time,
            "actor": self.actor,
            "action": self.action,
            "kind": self.kind,
            "name": self.name,
            "revision": self.revision,
            "previousRevision": self.previous_revision,
            "changes": self.changes,
            "message": self.message,
        }
        for key in ("before", "after", "details"):
            if (value := getattr(self, key)) is not None:
                out[key] = value
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AuditEntry:
        return cls(
            id=data["id"],
            time=data["time"],
            actor=data["actor"],
            action=data["action"],
            kind=data["kind"],
            name=data["name"],
            revision=data.get("revision"),
            previous_revision=data.get("previousRevision"),
            changes=data.get("changes", []),
            message=data.get("message", ""),
            before=data.get("before"),
            after=data.get("after"),
            details=data.get("details"),
        )


RELEASE_ACTIONS: tuple[str, ...] = ("set", "promote", "abort", "auto-abort")
"""What a release write does; its audit entry's action is ``release.<action>``."""


@dataclass(frozen=True)
class ReleaseState:
    """An agent's release policy and the etcd version of its key: 0 when it has none, 1
    once set, +1 per change -- what a guarded write passes as ``expected_version``."""

    spec: ReleaseSpec | None
    version: int
    changed: bool = False
    """Of a write: whether it wrote anything (a ``set`` equal to the stored policy does
    not)."""


_IDEMPOTENT = ("apply", "prompt", "mcp")
"""Agent write actions that write nothing when nothing changed."""

_REFRESH_ATTEMPTS = 5
"""How often a prompt or MCP change retries one dependent agent's new revision when a
concurrent writer got there first."""


@dataclass(frozen=True)
class PromptHistory:
    """A prompt's versions and release changes, oldest first."""

    versions: list[PromptEntry]
    published: dict[str, AuditEntry]
    """Version -> the audit entry of its publish (absent for versions published before
    the audit log held it)."""
    release_changes: list[AuditEntry]
    """Release sets (kind ``PromptRelease``) and rollbacks (kind ``Prompt``)."""


def _same_name(a: str, b: str) -> bool:
    """Whether two audit names denote the same object (logical names compare by resource
    name; other names -- ``key@version``, references -- exactly)."""
    if a == b:
        return True
    if check_logical_name(a) is None and check_logical_name(b) is None:
        return resource_name(a) == resource_name(b)
    return False


def _refuse_plaintext(spec: AgentSpec) -> None:
    plain = [path for path, value in iter_secrets(spec) if not is_reference(value)]
    if plain:
        raise SpecError(
            [
                SpecIssue(
                    format_path(p),
                    "plaintext_secret",
                    "plaintext secret refused by the store; apply through the spec service, "
                    "which moves it into Vault",
                )
                for p in plain
            ]
        )


class SpecStore:
    """Agents, prompts, MCP entries and releases in etcd under one key prefix."""

    def __init__(self, *, etcd: EtcdClient, keys: Keys | None = None) -> None:
        self.etcd = etcd
        self.keys = keys or Keys()

    # ------------------------------------------------------------ audit

    def _audit(
        self,
        *,
        actor: str,
        action: str,
        kind: str,
        name: str,
        revision: int | None,
        previous: int | None,
        changes: list[Change],
        message: str = "",
        before: dict[str, Any] | None = None,
        after: dict[str, Any] | None = None,
        details: dict[str, Any] | None = None,
    ) -> tuple[AuditEntry, Op]:
        now = _now()
        entry = AuditEntry(
            id=_random.token_hex(6),
            time=now.isoformat(),
            actor=actor,
            action=action,
            kind=kind,
            name=name,
            revision=revision,
            previous_revision=previous,
            changes=[c.to_json() for c in changes],
            message=message,
            before=before,
            after=after,
            details=details,
        )
        stamp = now.strftime("%Y%m%dT%H%M%S.%fZ")
        return entry, Op.put(self.keys.audit_entry(stamp, entry.id), dumps(entry.to_json()))

    async def record(
        self, *, actor: str, action: str, kind: str, name: str, message: str = ""
    ) -> AuditEntry:
        """An audit entry for a change made outside etcd (e.g. a credential in Vault)."""
        entry, op = self.audit_op(actor=actor, action=action, kind=kind, name=name, message=message)
        await self.etcd.put(op.key, op.value)
        return entry

    def audit_op(
        self, *, actor: str, action: str, kind: str, name: str, message: str = ""
    ) -> tuple[AuditEntry, Op]:
        """An audit entry and the put that writes it, for a caller's own transaction (the
        control plane's token store writes a change and its audit entry atomically)."""
        return self._audit(
            actor=actor,
            action=action,
            kind=kind,
            name=name,
            revision=None,
            previous=None,
            changes=[],
            message=message,
        )

    async def audit_entries(
        self, *, name: str | None = None, kind: str | None = None, limit: int = 100
    ) -> list[AuditEntry]:
        """Newest first."""
        result = await self.etcd.range(self.keys.audit(), prefix=True)
        entries = [AuditEntry.from_json(json.loads(kv.value)) for kv in reversed(result.kvs)]
        if name is not None:
            entries = [e for e in entries if _same_name(e.name, name)]
        if kind is not None:
            entries = [e for e in entries if e.kind == kind]
        return entries[:limit]

    # ------------------------------------------------------------ agents

    async def _meta(self, name: str) -> tuple[int, dict[str, Any] | None]:
        revision, meta, _ = await self._meta_at(name)
        return revision, meta

    async def _meta_at(self, name: str) -> tuple[int, dict[str, Any] | None, int]:
        """(agent revision, meta, store revision of the read)."""
        result = await self.etcd.range(self.keys.agent_meta(name))
        if not result.kvs:
            return 0, None, result.revision
        kv = result.kvs[0]
        return kv.version, json.loads(kv.value), result.revision

    async def current_revision(self, name: str) -> int:
        """The agent's current revision (0 when it does not exist)."""
        revision, _ = await self._meta(name)
        return revision

    async def apply_agent(
        self,
        name: str,
        spec: AgentSpec,
        *,
        actor: str,
        expected_revision: int | None = None,
        message: str = "",
        action: str = "apply",
        rolled_back_from: int | None = None,
        resolved: dict[str, Any] | None = None,
    ) -> ApplyResult:
        """Write a new revision of ``name`` if ``spec`` or what it resolves differs from the
        current one (a ``rollback`` always writes one).

        ``expected_revision``: the revision the caller read (0 to create); when ``None``
        the current revision is read and used, so only a concurrent writer can conflict.
        ``resolved``: the prompt versions and MCP entries the revision runs with (a rollback
        passes its target's); ``None`` resolves them now (:meth:`resolve`). An ``apply`` on
        a revision written before revisions recorded ``resolved`` compares the spec only.
        """
        _refuse_plaintext(spec)
        if resolved is None:
            resolved = await self.resolve(spec)
        current, meta, read_at = await self._meta_at(name)
        if meta is not None and meta["name"] != name:
            raise NameCollisionError(
                name=name, existing=meta["name"], resource_name=resource_name(name)
            )
        expected = current if expected_revision is None else expected_revision
        if expected != current:
            raise ConflictError(kind="agent", name=name, expected=expected, actual=current)
        new_parts = spec.model_dump(mode="json")
        old_parts: dict[str, Any] = {}
        old_resolved: dict[str, Any] | None = None
        if current:
            # the parts as of the same store revision as the meta read: one snapshot
            stored = await self.etcd.range(
                self.keys.agent_parts(name), prefix=True, revision=read_at
            )
            for kv in stored.kvs:
                old_parts[kv.key.rsplit("/", 1)[-1]] = json.loads(kv.value)
            bundle = await self.etcd.range(
                self.keys.agent_revision(name, current), revision=read_at
            )
            if bundle.kvs:
                old_resolved = json.loads(bundle.kvs[0].value).get("resolved")
        changes = diff_json(old_parts, new_parts)
        if current and (old_resolved is not None or action != "apply"):
            changes += diff_json({"resolved": old_resolved}, {"resolved": resolved})
        if not changes and action in _IDEMPOTENT:
            return ApplyResult(
                agent=name, revision=current, previous_revision=current, changed=False
            )
        revision = current + 1
        record = AgentRecord(
            name=name,
            revision=revision,
            spec=new_parts,
            created_at=_now().isoformat(),
            author=actor,
            action=action,
            message=message,
            rolled_back_from=rolled_back_from,
            resolved=resolved,
        )
        entry, audit_op = self._audit(
            actor=actor,
            action=action,
            kind="Agent",
            name=name,
            revision=revision,
            previous=current or None,
            changes=changes,
            message=message,
        )
        ops = [
            Op.put(
                self.keys.agent_meta(name),
                dumps(
                    {
                        "name": name,
                        "revision": revision,
                        "updatedAt": record.created_at,
                        "updatedBy": actor,
                        "description": spec.base.description,
                    }
                ),
            ),
            Op.put(self.keys.agent_revision(name, revision), dumps(record.to_json())),
            audit_op,
        ]
        for part in PART_NAMES:
            if old_parts.get(part) != new_parts[part]:
                ops.append(Op.put(self.keys.agent_part(name, part), dumps(new_parts[part])))
        result = await self.etcd.txn(
            compare=[
                Compare(self.keys.agent_meta(name), "VERSION", "EQUAL", current),
                Compare(self.keys.agent_revision(name, revision), "CREATE", "EQUAL", 0),
            ],
            success=ops,
        )
        if not result.succeeded:
            actual = await self.current_revision(name)
            raise ConflictError(kind="agent", name=name, expected=expected, actual=actual)
        return ApplyResult(
            agent=name,
            revision=revision,
            previous_revision=current,
            changed=True,
            changes=changes,
            audit_id=entry.id,
            etcd_revision=result.revision,
        )

    async def get_agent(self, name: str, revision: int | None = None) -> AgentRecord:
        """The current revision of an agent, or the given one."""
        if revision is None:
            revision = await self.current_revision(name)
            if revision == 0:
                raise NotFoundError(kind="agent", name=name)
        kv = await self.etcd.get(self.keys.agent_revision(name, revision))
        if kv is None:
            raise NotFoundError(kind="agent revision", name=f"{name}@{revision}")
        return AgentRecord.from_json(json.loads(kv.value))

    async def list_agents(self) -> list[AgentSummary]:
        result = await self.etcd.range(self.keys.agents(), prefix=True)
        out = []
        for kv in result.kvs:
            if kv.key.endswith("/meta"):
                meta = json.loads(kv.value)
                out.append(
                    AgentSummary(
                        name=meta["name"],
                        revision=kv.version,
                        updated_at=meta["updatedAt"],
                        updated_by=meta["updatedBy"],
                        description=meta.get("description", ""),
                    )
                )
        return out

    async def history(self, name: str) -> list[AgentRecord]:
        """Every revision, oldest first."""
        result = await self.etcd.range(self.keys.agent_revisions(name), prefix=True)
        if not result.kvs:
            raise NotFoundError(kind="agent", name=name)
        return [AgentRecord.from_json(json.loads(kv.value)) for kv in result.kvs]

    async def diff(self, name: str, from_revision: int, to_revision: int) -> list[Change]:
        old = await self.get_agent(name, from_revision)
        new = await self.get_agent(name, to_revision)
        return diff_json(old.spec, new.spec)

    async def rollback(
        self,
        name: str,
        revision: int,
        *,
        actor: str,
        expected_revision: int | None = None,
        message: str = "",
    ) -> ApplyResult:
        """A new revision whose spec and ``resolved`` equal revision ``revision``'s (its
        prompt versions and MCP entries, not what they would resolve to now; a revision
        written before ``resolved`` was recorded is resolved now); ``message`` follows
        "rollback to revision N" in the revision and its audit entry."""
        target = await self.get_agent(name, revision)
        spec = validate_model(AgentSpec, target.spec, source=f"{name}@{revision}")
        return await self.apply_agent(
            name,
            spec,
            actor=actor,
            expected_revision=expected_revision,
            message=f"rollback to revision {revision}" + (f": {message}" if message else ""),
            action="rollback",
            rolled_back_from=revision,
            resolved=target.resolved,
        )

    async def delete_agent(
        self, name: str, *, actor: str, expected_revision: int | None = None
    ) -> None:
        current = await self.current_revision(name)
        if current == 0:
            raise NotFoundError(kind="agent", name=name)
        expected = current if expected_revision is None else expected_revision
        _, audit_op = self._audit(
            actor=actor,
            action="delete",
            kind="Agent",
            name=name,
            revision=None,
            previous=current,
            changes=[],
        )
        result = await self.etcd.txn(
            compare=[Compare(self.keys.agent_meta(name), "VERSION", "EQUAL", expected)],
            success=[
                Op.delete(self.keys.agent(name), prefix=True),
                # a later agent of the same name does not inherit what was shared with it
                Op.delete(self.keys.grants(name), prefix=True),
                Op.delete(self.keys.status(name)),
                Op.delete(self.keys.agent_analysis(name)),
                audit_op,
            ],
        )
        if not result.succeeded:
            actual = await self.current_revision(name)
            raise ConflictError(kind="agent", name=name, expected=expected, actual=actual)

    async def partner_graph(self) -> dict[str, list[str]]:
        """Agent -> partner names, for every agent (from the current partnerAgents parts)."""
        result = await self.etcd.range(self.keys.agents(), prefix=True)
        names: dict[str, str] = {}
        partners: dict[str, list[str]] = {}
        for kv in result.kvs:
            agent_rn = kv.key[len(self.keys.agents()) :].split("/", 1)[0]
            if kv.key.endswith("/meta"):
                names[agent_rn] = json.loads(kv.value)["name"]
            elif kv.key.endswith("/spec/partnerAgents"):
                partners[agent_rn] = [p["agentName"] for p in json.loads(kv.value)]
        return {names[rn]: ps for rn, ps in partners.items() if rn in names}

    # ------------------------------------------------------------ resolution

    async def resolve(self, spec: AgentSpec) -> dict[str, Any]:
        """What a revision of ``spec`` written now runs with: its prompt versions and MCP
        Registry entries (:mod:`specmesh.resolution`)."""
        key = spec.base.prompt_key
        versions = [e.version for e in await self.list_prompt_versions(key)]
        return resolve(
            spec, versions, await self.get_prompt_release(key), await self.list_mcp_servers()
        )

    async def refresh_dependents(
        self,
        *,
        actor: str,
        message: str,
        prompt_key: str | None = None,
        mcp_server: str | None = None,
    ) -> list[ApplyResult]:
        """A new revision (action ``prompt``, or ``mcp`` for ``mcp_server``) of every agent
        whose current spec uses ``prompt_key`` (or ``mcp_server``) and whose resolution
        differs from what its current revision recorded; agents it does not change get no
        revision. Each agent is its own transaction guarded by the revision read, retried
        when a concurrent writer got there first.

        Every prompt and MCP write calls this after its own write, and it compares *every*
        dependent agent with the live Prompt Center and Registry, not only those the write
        changed: if the process dies between two agents, the rest keep serving their
        previous, complete revision until the next write of that prompt or server -- the
        same command run again included -- or an apply of the agent writes their new one."""
        action = "prompt" if prompt_key is not None else "mcp"

        def uses(spec: AgentSpec) -> bool:
            if prompt_key is not None:
                return uses_prompt(spec, prompt_key)
            return mcp_server is not None and uses_mcp_server(spec, mcp_server)

        results: list[ApplyResult] = []
        for name in [a.name for a in await self.list_agents()]:
            for _ in range(_REFRESH_ATTEMPTS):
                try:
                    record = await self.get_agent(name)
                    spec = record.spec_model()
                    if not uses(spec):
                        break
                    result = await self.apply_agent(
                        name,
                        spec,
                        actor=actor,
                        expected_revision=record.revision,
                        message=message,
                        action=action,
                    )
                except NotFoundError:
                    break  # deleted meanwhile
                except ConflictError:
                    continue
                if result.changed:
                    results.append(result)
                break
            else:
                logger.warning(
                    "agent %s kept changing while its %s changed; its next revision is "
                    "left to the next write of it",
                    name,
                    action,
                )
        return results

    # ------------------------------------------------------------ grants

    async def put_grant(self, agent: str, mount: str, path: str, *, actor: str) -> bool:
        """Share the Vault secret ``mount/path`` with ``agent``; False if already shared. The
        agent need not exist yet: a secrets-admin may share a secret before the agent that
        references it is applied (deleting the agent ends its grants)."""
        key = self.keys.grant(agent, grant_id(mount, path))
        data = {"agent": agent, "mount": mount, "path": path, "grantedBy": actor,
                "grantedAt": _now().isoformat()}  # fmt: skip
        _, audit_op = self._audit(
            actor=actor, action="grant", kind="Grant", name=agent, revision=None,
            previous=None, changes=diff_json({}, {"secret": f"{mount}/{path}"}),
        )  # fmt: skip
        result = await self.etcd.txn(
            compare=[Compare(key, "CREATE", "EQUAL", 0)],
            success=[Op.put(key, dumps(data)), audit_op],
        )
        return bool(result.succeeded)

    async def delete_grant(self, agent: str, mount: str, path: str, *, actor: str) -> None:
        key = self.keys.grant(agent, grant_id(mount, path))
        if await self.etcd.get(key) is None:
            raise NotFoundError(kind="grant", name=f"{agent}: {mount}/{path}")
        _, audit_op = self._audit(
            actor=actor, action="revoke", kind="Grant", name=agent, revision=None,
            previous=None, changes=diff_json({"secret": f"{mount}/{path}"}, {}),
        )  # fmt: skip
        await self.etcd.txn(compare=[], success=[Op.delete(key), audit_op])

    async def list_grants(self, agent: str | None = None) -> list[dict[str, Any]]:
        """Grants of ``agent`` (or of every agent): ``{agent, mount, path, grantedBy, ...}``."""
        result = await self.etcd.range(self.keys.grants(agent), prefix=True)
        return [json.loads(kv.value) for kv in result.kvs]

    # ------------------------------------------------------------ prompts

    async def put_prompt_version(
        self, entry: PromptEntry, *, actor: str, message: str = "", refresh: bool = True
    ) -> bool:
        """Publish a prompt version; versions are immutable. Return False if it already exists
        with the same content; raise ConflictError if it exists with other content. Agents
        whose prompt now resolves otherwise get a new revision (:meth:`refresh_dependents`;
        ``refresh=False`` leaves that to a release change that follows)."""
        key = self.keys.prompt_version(entry.prompt_key, entry.version)
        value = dumps(entry.model_dump(mode="json"))
        _, audit_op = self._audit(
            actor=actor,
            action="publish",
            kind="Prompt",
            name=f"{entry.prompt_key}@{entry.version}",
            revision=None,
            previous=None,
            changes=diff_json({}, entry.model_dump(mode="json")),
            message=message,
        )
        result = await self.etcd.txn(
            compare=[Compare(key, "CREATE", "EQUAL", 0)], success=[Op.put(key, value), audit_op]
        )
        existing = None if result.succeeded else await self.etcd.get(key)
        if result.succeeded or (existing is not None and existing.value.decode() == value):
            if refresh:
                await self.refresh_dependents(
                    actor=actor,
                    prompt_key=entry.prompt_key,
                    message=_why(f"prompt {entry.prompt_key} version {entry.version}", message),
                )
            return bool(result.succeeded)
        raise ConflictError(
            kind="prompt version",
            name=f"{entry.prompt_key}@{entry.version}",
            expected=None,
            actual=existing.version if existing else None,
        )

    async def get_prompt_version(self, key: str, version: str) -> PromptEntry:
        kv = await self.etcd.get(self.keys.prompt_version(key, version))
        if kv is None:
            raise NotFoundError(kind="prompt version", name=f"{key}@{version}")
        return PromptEntry.model_validate_json(kv.value)

    async def list_prompt_versions(self, key: str) -> list[PromptEntry]:
        result = await self.etcd.range(self.keys.prompt_versions(key), prefix=True)
        return [PromptEntry.model_validate_json(kv.value) for kv in result.kvs]

    async def list_prompts(self) -> dict[str, list[str]]:
        """Prompt key -> versions."""
        result = await self.etcd.range(self.keys.prompts(), prefix=True)
        out: dict[str, list[str]] = {}
        for kv in result.kvs:
            if "/versions/" in kv.key:
                data = json.loads(kv.value)
                out.setdefault(data["promptKey"], []).append(data["version"])
        return out

    async def set_prompt_release(
        self, key: str, release: PromptRelease, *, actor: str, message: str = ""
    ) -> bool:
        """Set a prompt's labels, weights and current version; return False when they were
        already so. Agents whose prompt now resolves otherwise get a new revision."""
        versions = {e.version for e in await self.list_prompt_versions(key)}
        named = set(release.labels.values()) | set(release.weights)
        unknown = sorted((named | ({release.current} if release.current else set())) - versions)
        if unknown:
            raise SpecError(
                [
                    SpecIssue(
                        "release",
                        "unknown_version",
                        f"prompt {key!r} has no version {', '.join(unknown)}",
                    )
                ]
            )
        changed = await self._put_with_audit(
            self.keys.prompt_release(key),
            release.model_dump(mode="json"),
            actor=actor,
            kind="PromptRelease",
            name=key,
            message=message,
        )
        await self.refresh_dependents(
            actor=actor, prompt_key=key, message=_why(f"prompt {key} release", message)
        )
        return changed

    async def rollback_prompt(
        self, key: str, version: str, *, actor: str, message: str = ""
    ) -> PromptRelease:
        """Serve ``version`` of prompt ``key`` again: the release's ``current`` becomes it and
        its A/B weights end (labels stay: an agent that pins a label keeps it). Audited as
        ``rollback`` of kind ``Prompt``; agents whose prompt now resolves otherwise get a new
        revision. Return the release as stored."""
        versions = {e.version for e in await self.list_prompt_versions(key)}
        if not versions:
            raise NotFoundError(kind="prompt", name=key)
        if version not in versions:
            raise NotFoundError(kind="prompt version", name=f"{key}@{version}")
        stored = await self.etcd.get(self.keys.prompt_release(key))
        old = PromptRelease.model_validate_json(stored.value) if stored else PromptRelease()
        release = PromptRelease(labels=old.labels, current=version)
        # guarded by the release read here: a label set in between is a conflict, not lost
        await self._put_with_audit(
            self.keys.prompt_release(key),
            release.model_dump(mode="json"),
            actor=actor,
            kind="Prompt",
            name=key,
            action="rollback",
            message=_why(f"rollback to {version}", message),
            read_mod_revision=stored.mod_revision if stored else 0,
        )
        await self.refresh_dependents(
            actor=actor,
            prompt_key=key,
            message=_why(f"prompt {key} rolled back to {version}", message),
        )
        return release

    async def prompt_history(self, key: str) -> PromptHistory:
        """A prompt's versions (with who published them, when) and its release changes
        (sets and rollbacks), oldest first, from the Prompt Center and the audit log."""
        entries = await self.list_prompt_versions(key)
        if not entries:
            raise NotFoundError(kind="prompt", name=key)
        published: dict[str, AuditEntry] = {}
        changes: list[AuditEntry] = []
        for e in reversed(await self.audit_entries(limit=sys.maxsize)):  # oldest first
            if e.kind == "Prompt" and e.name.rpartition("@")[0] == key:
                published[e.name.rpartition("@")[2]] = e
            elif e.kind in ("Prompt", "PromptRelease") and e.name == key:
                changes.append(e)
        entries.sort(
            key=lambda v: (published[v.version].time if v.version in published else "",
                           version_key(v.version))
        )  # fmt: skip
        return PromptHistory(versions=entries, published=published, release_changes=changes)

    async def get_prompt_release(self, key: str) -> PromptRelease | None:
        kv = await self.etcd.get(self.keys.prompt_release(key))
        return PromptRelease.model_validate_json(kv.value) if kv else None

    # ------------------------------------------------------------ MCP Registry, releases

    async def put_mcp_server(
        self, name: str, spec: McpServerSpec, *, actor: str, message: str = ""
    ) -> bool:
        """Register or change an MCP server; agents that use it and recorded another entry
        get a new revision (action ``mcp``). Return False when nothing changed."""
        data = {"name": name, **spec.model_dump(mode="json")}
        changed = await self._put_with_audit(
            self.keys.mcp_server(name),
            data,
            actor=actor,
            kind="McpServer",
            name=name,
            message=message,
        )
        await self.refresh_dependents(
            actor=actor, mcp_server=name, message=_why(f"MCP server {name}", message)
        )
        return changed

    async def get_mcp_server(self, name: str) -> McpServerSpec:
        kv = await self.etcd.get(self.keys.mcp_server(name))
        if kv is None:
            raise NotFoundError(kind="MCP server", name=name)
        data = json.loads(kv.value)
        data.pop("name", None)
        return McpServerSpec.model_validate(data)

    async def list_mcp_servers(self) -> dict[str, McpServerSpec]:
        result = await self.etcd.range(self.keys.mcp_servers(), prefix=True)
        out = {}
        for kv in result.kvs:
            data = json.loads(kv.value)
            name = data.pop("name")
            out[name] = McpServerSpec.model_validate(data)
        return out

    async def put_release(
        self,
        agent: str,
        spec: ReleaseSpec,
        *,
        actor: str,
        message: str = "",
        action: str = "set",
        expected_version: int | None = None,
        details: dict[str, Any] | None = None,
    ) -> ReleaseState:
        """Write ``agent``'s release policy in one transaction with its audit entry
        (action ``release.<action>``, the policy before and after, ``details``), guarded
        by the release key's version: ``expected_version`` is the version the caller read
        (0: no release yet); when ``None`` the version read here is used, so only a
        concurrent writer can conflict. A ``set`` equal to the stored policy writes
        nothing. Returns the policy, its version after the call and whether it wrote."""
        if action not in RELEASE_ACTIONS:
            raise ValueError(f"release action {action!r}: not one of {RELEASE_ACTIONS}")
        current = await self.current_revision(agent)
        if current == 0:
            raise NotFoundError(kind="agent", name=agent)
        bad = [r for r in (spec.stable_revision, spec.canary_revision) if r and r > current]
        if bad:
            raise SpecError(
                [
                    SpecIssue(
                        "spec",
                        "unknown_revision",
                        f"agent {agent!r} has no revision {bad[0]} (latest is {current})",
                    )
                ]
            )
        key = self.keys.agent_release(agent)
        existing = await self.etcd.get(key)
        version = existing.version if existing else 0
        expected = version if expected_version is None else expected_version
        if expected != version:
            raise ConflictError(
                kind="release", name=agent, expected=expected, actual=version, counter="version"
            )
        before = json.loads(existing.value) if existing else None
        after = spec.model_dump(mode="json")
        changes = diff_json(before or {}, after)
        if existing is not None and not changes and action == "set":
            return ReleaseState(spec, version)
        _, audit_op = self._audit(
            actor=actor,
            action=f"release.{action}",
            kind="Release",
            name=agent,
            revision=None,
            previous=None,
            changes=changes,
            message=message,
            before=before,
            after=after,
            details=details,
        )
        result = await self.etcd.txn(
            compare=[Compare(key, "VERSION", "EQUAL", version)],
            success=[Op.put(key, dumps(after)), audit_op],
        )
        if not result.succeeded:
            actual = (await self.get_release_state(agent)).version
            raise ConflictError(
                kind="release", name=agent, expected=expected, actual=actual, counter="version"
            )
        return ReleaseState(spec, version + 1, changed=True)

    async def get_release(self, agent: str) -> ReleaseSpec | None:
        return (await self.get_release_state(agent)).spec

    async def get_release_state(self, agent: str) -> ReleaseState:
        """The release policy and its version, from one read."""
        kv = await self.etcd.get(self.keys.agent_release(agent))
        if kv is None:
            return ReleaseState(None, 0)
        return ReleaseState(ReleaseSpec.model_validate_json(kv.value), kv.version)

    async def put_analysis(self, agent: str, state: dict[str, Any]) -> None:
        """Write the progress of an agent's release analysis (the analysis loop's; not
        audited: the release changes it makes are)."""
        await self.etcd.put(self.keys.agent_analysis(agent), dumps(state))

    async def get_analysis(self, agent: str) -> dict[str, Any] | None:
        kv = await self.etcd.get(self.keys.agent_analysis(agent))
        return dict(json.loads(kv.value)) if kv else None

    async def list_instances(self, agent: str | None = None) -> list[dict[str, Any]]:
        """Live instances from the Agent Registry (their keys live under leases)."""
        result = await self.etcd.range(self.keys.registry(agent), prefix=True)
        return [json.loads(kv.value) for kv in result.kvs]

    async def put_status(self, agent: str, status: dict[str, Any]) -> None:
        """Write an agent's observed state (the controller's; not audited: it is not a
        change anyone made)."""
        await self.etcd.put(self.keys.status(agent), dumps(status))

    async def get_status(self, agent: str) -> dict[str, Any] | None:
        kv = await self.etcd.get(self.keys.status(agent))
        return dict(json.loads(kv.value)) if kv else None

    async def list_statuses(self) -> dict[str, dict[str, Any]]:
        """Resource name -> observed state, of every agent the controller reported on."""
        result = await self.etcd.range(self.keys.statuses(), prefix=True)
        prefix = self.keys.statuses()
        return {kv.key.removeprefix(prefix): json.loads(kv.value) for kv in result.kvs}

    async def delete_status(self, agent: str) -> None:
        await self.etcd.delete(self.keys.status(agent))

    async def _put_with_audit(
        self,
        key: str,
        data: dict[str, Any],
        *,
        actor: str,
        kind: str,
        name: str,
        message: str = "",
        action: str = "apply",
        read_mod_revision: int | None = None,
    ) -> bool:
        """Put ``data`` at ``key`` with an audit entry, guarded against concurrent change
        (since ``read_mod_revision``, the key's mod revision when the caller read what
        ``data`` is made from, 0: absent; else since the read here). Return False when
        nothing changed."""
        existing = await self.etcd.get(key)
        if read_mod_revision is not None and read_mod_revision != (
            existing.mod_revision if existing else 0
        ):
            raise ConflictError(kind=kind, name=name, expected=None, actual=None)
        old = json.loads(existing.value) if existing else {}
        changes = diff_json(old, data)
        if existing is not None and not changes:
            return False
        _, audit_op = self._audit(
            actor=actor,
            action=action,
            kind=kind,
            name=name,
            revision=None,
            previous=None,
            changes=changes,
            message=message,
        )
        guard = Compare(key, "MOD", "EQUAL", existing.mod_revision if existing else 0)
        result = await self.etcd.txn(compare=[guard], success=[Op.put(key, dumps(data)), audit_op])
        if not result.succeeded:
            raise ConflictError(kind=kind, name=name, expected=None, actual=None)
        return True
