"""The spec service: the one place that turns manifests into stored state.

validate -> move plaintext secrets into Vault (replace them with references) ->
write the agent's Vault policy -> one guarded etcd transaction. The CLI uses it
directly today; the control plane will call the same code.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from specmesh.errors import (
    NotFoundError,
    SecretNotFoundError,
    SecretReferenceError,
    SpecError,
    SpecIssue,
)
from specmesh.names import resource_name
from specmesh.pki import agent_role_params
from specmesh.secrets import VaultRef, is_reference
from specmesh.spec.manifest import LoadedManifest
from specmesh.spec.models import (
    AgentManifest,
    AgentSpec,
    McpServerManifest,
    PromptEntry,
    PromptManifest,
    ReleaseManifest,
)
from specmesh.spec.secretpaths import Path, iter_secrets, replace_values
from specmesh.spec.validation import (
    find_partner_cycles,
    format_path,
    prompt_issues,
    reference_warnings,
)
from specmesh.store import ApplyResult, SpecStore
from specmesh.vault import (
    VaultClient,
    agent_pki_role,
    agent_policy,
    agent_policy_name,
    agent_secret_prefix,
    is_infra_agent_secret,
)

__all__ = ["ApplyOutcome", "GarbageReport", "SpecService", "secret_ref_for"]

logger = logging.getLogger(__name__)


@dataclass
class ApplyOutcome:
    """The result of applying one manifest."""

    kind: str
    name: str
    source: str
    changed: bool
    revision: int | None = None
    result: ApplyResult | None = None
    warnings: list[SpecIssue] = field(default_factory=list)
    secrets_moved: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "name": self.name,
            "source": self.source,
            "changed": self.changed,
            "revision": self.revision,
            "warnings": [str(w) for w in self.warnings],
            "secretsMoved": self.secrets_moved,
        }
        if self.result is not None:
            out["changes"] = [c.to_json() for c in self.result.changes]
        return out


def secret_ref_for(agent: str, path: Path, spec_json: dict[str, Any], *, mount: str) -> VaultRef:
    """Where apply stores the secret at ``path``: list elements are named by their
    ``mcpServerName`` / ``agentName`` rather than their index, so reordering a list
    does not move its secrets."""
    segments: list[str] = []
    node: Any = spec_json
    for element in path:
        if isinstance(element, int):
            item = node[element]
            label = item.get("mcpServerName") or item.get("agentName")
            segments.append(str(label).lower() if label else str(element))
        else:
            segments.append(str(element))
        node = node[element]
    *location, last = segments
    built = f"vault://{mount}/{'/'.join([agent_secret_prefix(agent), *location, last])}#value"
    try:
        return VaultRef.parse(built)  # a header named `..` must not become a path segment
    except SecretReferenceError as e:
        raise SpecError(
            [
                SpecIssue(
                    format_path(path), "secret_location", f"cannot store this secret: {e.reason}"
                )
            ]
        ) from None


class SpecService:
    """Validation, secret externalisation and storage of manifests."""

    def __init__(
        self,
        *,
        store: SpecStore,
        vault: VaultClient,
        kv_mount: str = "secret",
        pki_mount: str | None = None,
        infrastructure_secret: VaultRef | None = None,
    ) -> None:
        self.store = store
        self.vault = vault
        self.kv_mount = kv_mount
        """The KV v2 mount of agents' secrets; the only mount a reference may name."""
        self.pki_mount = pki_mount
        """Vault PKI mount of the agents' mTLS certificates: apply keeps a role per agent
        there (its SPIFFE ID only); ``None`` when Istio does mTLS."""
        self.infrastructure_secret = infrastructure_secret
        """The one infrastructure secret every agent's policy may read (the shared A2A task
        store's password, control-plane setting ``SPECMESH_TASK_STORE_PASSWORD``)."""

    async def apply(
        self,
        loaded: LoadedManifest,
        *,
        actor: str,
        expected_revision: int | None = None,
        dry_run: bool = False,
        message: str = "",
    ) -> ApplyOutcome:
        """Apply one manifest; ``message`` is stored with the audit entry (and an agent's
        revision)."""
        m = loaded.manifest
        if isinstance(m, AgentManifest):
            return await self._apply_agent(loaded, m, actor, expected_revision, dry_run, message)
        if isinstance(m, PromptManifest):
            entry = PromptEntry(
                prompt_key=m.metadata.name,
                version=m.spec.version,
                template=m.spec.template,
                variables=m.spec.variables,
                description=m.spec.description,
            )
            changed = False
            if not dry_run:
                # a release in the manifest refreshes the agents using the prompt once, after it
                changed = await self.store.put_prompt_version(
                    entry, actor=actor, message=message, refresh=m.spec.release is None
                )
                if m.spec.release is not None:
                    released = await self.store.set_prompt_release(
                        m.metadata.name, m.spec.release, actor=actor, message=message
                    )
                    changed = changed or released
            return ApplyOutcome(
                "Prompt", f"{m.metadata.name}@{m.spec.version}", loaded.source, changed
            )
        if isinstance(m, McpServerManifest):
            changed = False
            if not dry_run:
                changed = await self.store.put_mcp_server(
                    m.metadata.name, m.spec, actor=actor, message=message
                )
            return ApplyOutcome("McpServer", m.metadata.name, loaded.source, changed)
        if isinstance(m, ReleaseManifest):
            changed = False
            if not dry_run:
                written = await self.store.put_release(
                    m.metadata.name, m.spec, actor=actor, message=message
                )
                changed = written.changed
            return ApplyOutcome("Release", m.metadata.name, loaded.source, changed)
        raise TypeError(f"unsupported manifest {type(m).__name__}")

    async def _apply_agent(
        self,
        loaded: LoadedManifest,
        m: AgentManifest,
        actor: str,
        expected_revision: int | None,
        dry_run: bool,
        message: str = "",
    ) -> ApplyOutcome:
        name = m.metadata.name
        spec_json = m.spec.model_dump(mode="json")
        grants = await self.store.list_grants(name)
        self._check_references(name, m.spec, loaded.source, grants)
        warnings = await self._warnings(name, m.spec, loaded.source)
        current = await self._current_refs(name)
        replacements: dict[Path, str] = {}
        moved: list[str] = []
        for path, value in iter_secrets(m.spec):
            if is_reference(value):
                continue
            location = secret_ref_for(name, path, spec_json, mount=self.kv_mount)
            if not dry_run:
                replacements[path] = str(await self._version_for(location, value, current))
            else:
                replacements[path] = str(location)
            moved.append(format_path(path))
        spec = AgentSpec.model_validate(replace_values(spec_json, replacements))
        if dry_run:
            return ApplyOutcome(
                "Agent", name, loaded.source, False, warnings=warnings, secrets_moved=moved
            )
        await self.write_identity(name, grants)
        result = await self.store.apply_agent(
            name, spec, actor=actor, expected_revision=expected_revision, message=message
        )
        for w in warnings:
            logger.warning("%s: %s", name, w)
        return ApplyOutcome(
            "Agent", name, loaded.source, result.changed, result.revision, result, warnings, moved
        )

    async def _current_refs(self, name: str) -> dict[tuple[str, str, str], VaultRef]:
        """The versioned references of the agent's current revision, by location."""
        try:
            record = await self.store.get_agent(name)
        except NotFoundError:
            return {}
        out = {}
        for _, value in iter_secrets(AgentSpec.model_validate(record.spec)):
            if is_reference(value):
                try:
                    ref = VaultRef.parse(value)
                except SecretReferenceError:
                    continue
                if ref.version is not None:
                    out[(ref.mount, ref.path, ref.field)] = ref
        return out

    async def _version_for(
        self, location: VaultRef, value: str, current: dict[tuple[str, str, str], VaultRef]
    ) -> VaultRef:
        """The reference to store for a plaintext ``value``: the current revision's version
        when it already holds the value (re-applying changes nothing), else a new version."""
        pinned = current.get((location.mount, location.path, location.field))
        if pinned is not None:
            try:
                if await self.vault.read(pinned) == value:
                    return pinned
            except SecretNotFoundError:
                pass
        return await self.vault.write_version(location, value)

    async def collect_garbage(
        self, *, grace_seconds: float = 3600.0, only: list[str] | None = None
    ) -> GarbageReport:
        """Destroy the KV versions under ``specmesh/agents/`` that no stored revision of any
        agent references: keys left by refused or crashed applies, and the keys of deleted
        agents. A version younger than ``grace_seconds`` is kept whatever its state (an apply
        may be between its Vault write and its etcd transaction), and so is the latest
        version of a secret some revision references without a version. The paths of an
        agent's tree that infrastructure owns (:data:`specmesh.vault.INFRA_AGENT_SECRETS`:
        the per-agent task-store password) are never swept, even once the agent is deleted
        (the operator removes them with the Redis user). ``only`` limits the sweep to these
        agents' trees (one Vault serving several stores, as in tests)."""
        referenced: dict[tuple[str, str], set[int]] = {}
        latest: set[tuple[str, str]] = set()
        for agent in await self.store.list_agents():
            try:
                records = await self.store.history(agent.name)
            except NotFoundError:
                continue  # deleted meanwhile: its versions go at the next run
            for record in records:
                for _, value in iter_secrets(AgentSpec.model_validate(record.spec)):
                    if not is_reference(value):
                        continue
                    try:
                        ref = VaultRef.parse(value)
                    except SecretReferenceError:
                        continue  # a revision from before today's rules: nothing it pins

                    if ref.version is None:
                        latest.add((ref.mount, ref.path))
                    else:
                        referenced.setdefault((ref.mount, ref.path), set()).add(ref.version)
        cutoff = datetime.now(UTC).timestamp() - grace_seconds
        report = GarbageReport()
        # only the trees of agents this store knows, or deleted: never another installation's
        # (one Vault, another etcd prefix) nor everything when etcd is empty or restored
        owned = {resource_name(a.name) for a in await self.store.list_agents()}
        owned |= {
            resource_name(e.name)
            for e in await self.store.audit_entries(kind="Agent", limit=100_000)
            if e.action == "delete"
        }
        names = [a for a in only if resource_name(a) in owned] if only is not None else owned
        roots = [agent_secret_prefix(a) for a in sorted(names)]
        paths = [
            p
            for root in roots
            for p in await self._secret_paths(root)
            if not is_infra_agent_secret(root, p)
        ]
        for path in paths:
            versions = await self.vault.versions(mount=self.kv_mount, path=path)
            newest = max(versions, default=0)
            doomed = []
            for number, meta in versions.items():
                if meta.get("destroyed"):
                    continue
                keep = (
                    number in referenced.get((self.kv_mount, path), set())
                    or ((self.kv_mount, path) in latest and number == newest)
                    or _created(meta).timestamp() > cutoff
                )
                if keep:
                    report.kept += 1
                else:
                    doomed.append(number)
            await self.vault.destroy_versions(mount=self.kv_mount, path=path, versions=doomed)
            report.destroyed += [f"vault://{self.kv_mount}/{path}@{n}" for n in sorted(doomed)]
        if report.destroyed:
            logger.info("destroyed %d unreferenced secret versions", len(report.destroyed))
        return report

    async def _secret_paths(self, folder: str) -> list[str]:
        out: list[str] = []
        pending = [folder]
        while pending:
            current = pending.pop()
            for key in await self.vault.list_keys(mount=self.kv_mount, path=current):
                path = f"{current}/{key}".rstrip("/")
                (pending if key.endswith("/") else out).append(path)
        return sorted(out)

    async def write_identity(self, name: str, grants: list[dict[str, Any]] | None = None) -> None:
        """The agent's Vault policy (its own tree, the secrets shared with it, its PKI role)
        and its PKI role (its SPIFFE ID only). Idempotent; run on apply and when its grants
        change."""
        if grants is None:
            grants = await self.store.list_grants(name)
        shared = [(g["mount"], g["path"]) for g in grants]
        await self.vault.put_policy(
            agent_policy_name(name),
            agent_policy(
                name,
                mount=self.kv_mount,
                shared=shared,
                pki_mount=self.pki_mount,
                infrastructure=(
                    (self.infrastructure_secret.mount, self.infrastructure_secret.path)
                    if self.infrastructure_secret is not None
                    else None
                ),
            ),
        )
        if self.pki_mount:
            await self.vault.put_pki_role(
                mount=self.pki_mount, name=agent_pki_role(name), params=agent_role_params(name)
            )

    async def write_identities(self) -> int:
        """Rewrite every agent's policy (the control plane starts with a changed
        infrastructure secret: agents applied before it get it too); returns how many."""
        agents = await self.store.list_agents()
        for agent in agents:
            await self.write_identity(agent.name)
        return len(agents)

    async def retire_identity(self, name: str) -> None:
        """A deleted agent's policy and PKI role go: tokens still holding the policy (a
        sidecar not stopped yet) can read nothing any more."""
        await self.vault.delete_policy(agent_policy_name(name))
        if self.pki_mount:
            with contextlib.suppress(SecretNotFoundError):
                await self.vault.delete_pki_role(mount=self.pki_mount, name=agent_pki_role(name))

    def check_location(self, ref: VaultRef) -> str | None:
        """Why a reference may not be used at all (a mount other than the KV mount of
        agents' secrets: never ``sys/``, ``auth/``, PKI...); None when it may."""
        if ref.mount != self.kv_mount:
            return (
                f"mount {ref.mount!r} is not allowed: references name the KV v2 mount "
                f"{self.kv_mount!r}"
            )
        return None

    def _check_references(
        self, name: str, spec: AgentSpec, source: str, grants: list[dict[str, Any]]
    ) -> None:
        """A spec may use its own secrets, and secrets outside every agent's tree that a
        secrets-admin shared with it; nothing else (no other mount, no other agent's key)."""
        own = agent_secret_prefix(name) + "/"
        shared = {(g["mount"], g["path"]) for g in grants}
        issues = []
        for path, value in iter_secrets(spec):
            if not is_reference(value):
                continue
            ref = VaultRef.parse(value)
            where = f"spec.{format_path(path)}"
            bad_mount = self.check_location(ref)
            if bad_mount:
                issues.append(SpecIssue(where, "secret_mount", bad_mount))
            elif ref.path.startswith(own):
                continue
            elif ref.path.startswith("specmesh/agents/"):
                issues.append(
                    SpecIssue(
                        where,
                        "foreign_secret",
                        f"refers to another agent's secret ({ref.location}); an agent may "
                        f"only use secrets under {self.kv_mount}/{own}* and secrets shared "
                        "with it",
                    )
                )
            elif (ref.mount, ref.path) not in shared:
                issues.append(
                    SpecIssue(
                        where,
                        "not_shared",
                        f"{ref.location} is outside the agent's own secrets and not shared "
                        f"with it: a secrets-admin must share it first (`specmesh grant create "
                        f"{name} vault://{ref.mount}/{ref.path}`)",
                    )
                )
        if issues:
            raise SpecError(issues, source=source)

    async def _warnings(self, name: str, spec: AgentSpec, source: str) -> list[SpecIssue]:
        """Warnings about the spec's references to the rest of the store; SpecError for
        those that cannot work (an unknown prompt, a missing MCP credential)."""
        warnings: list[SpecIssue] = []
        graph = await self.store.partner_graph()
        graph = {k: v for k, v in graph.items() if k.lower() != name.lower()}
        graph[name] = [p.agent_name for p in spec.partner_agents]
        for cycle in find_partner_cycles(graph, name):
            warnings.append(
                SpecIssue(
                    "spec.partnerAgents",
                    "partner_cycle",
                    "partner cycle "
                    + " -> ".join(cycle)
                    + " (calls are stopped by the call-depth limit)",
                    "warning",
                )
            )
        registered = await self.store.list_mcp_servers()
        errors: list[SpecIssue] = []
        for i, ref in enumerate(spec.mcp_servers):
            entry = registered.get(ref.mcp_server_name)
            if entry is not None:
                template = entry.credential_template
                for kind, names, given in (
                    ("headers", template.headers, ref.headers),
                    ("queryParams", template.query_params, ref.query_params),
                ):
                    errors.extend(
                        SpecIssue(
                            f"spec.mcpServers[{i}].{kind}",
                            "credential_missing",
                            f"MCP server {ref.mcp_server_name!r} needs {kind} {n!r}",
                        )
                        for n in names
                        if n not in given
                    )
        release = await self.store.get_prompt_release(spec.base.prompt_key)
        prompt_errors, prompt_warnings = prompt_issues(
            spec, await self.store.list_prompts(), release.labels if release else ()
        )
        errors += _under_spec(prompt_errors)
        if errors:
            raise SpecError(errors, source=source)
        others = [a for a in graph if a.lower() != name.lower()]
        return [
            *warnings,
            *_under_spec(prompt_warnings),
            *_under_spec(reference_warnings(spec, agents=others, mcp_servers=registered)),
        ]


def _under_spec(issues: list[SpecIssue]) -> list[SpecIssue]:
    return [SpecIssue(f"spec.{i.path}", i.rule, i.message, i.severity) for i in issues]


@dataclass
class GarbageReport:
    """What :meth:`SpecService.collect_garbage` destroyed and kept."""

    destroyed: list[str] = field(default_factory=list)
    """``vault://mount/path#@version`` of every version destroyed."""
    kept: int = 0
    """Versions still referenced (or too recent to judge)."""

    def to_json(self) -> dict[str, Any]:
        return {"destroyed": self.destroyed, "kept": self.kept}


def _created(meta: dict[str, Any]) -> datetime:
    """A KV version's ``created_time`` (RFC 3339 with nanoseconds) as a datetime."""
    raw = str(meta.get("created_time") or "")
    head, _, frac = raw.rstrip("Z").partition(".")
    try:
        return datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}+00:00")
    except ValueError:
        return datetime.now(UTC)  # unknown age: treated as new, never destroyed
