"""The spec service: the one place that turns manifests into stored state.

validate -> move plaintext secrets into Vault (replace them with references) ->
write the agent's Vault policy -> one guarded etcd transaction. The CLI uses it
directly today; the control plane will call the same code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from specmesh.errors import SpecError, SpecIssue
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
from specmesh.vault import VaultClient, agent_policy, agent_policy_name, agent_secret_prefix

__all__ = ["ApplyOutcome", "SpecService", "secret_ref_for"]

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
    return VaultRef(
        mount=mount, path="/".join([agent_secret_prefix(agent), *location, last]), field="value"
    )


class SpecService:
    """Validation, secret externalisation and storage of manifests."""

    def __init__(self, *, store: SpecStore, vault: VaultClient, kv_mount: str = "secret") -> None:
        self.store = store
        self.vault = vault
        self.kv_mount = kv_mount

    async def apply(
        self,
        loaded: LoadedManifest,
        *,
        actor: str,
        expected_revision: int | None = None,
        dry_run: bool = False,
    ) -> ApplyOutcome:
        m = loaded.manifest
        if isinstance(m, AgentManifest):
            return await self._apply_agent(loaded, m, actor, expected_revision, dry_run)
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
                changed = await self.store.put_prompt_version(entry, actor=actor)
                if m.spec.release is not None:
                    released = await self.store.set_prompt_release(
                        m.metadata.name, m.spec.release, actor=actor
                    )
                    changed = changed or released
            return ApplyOutcome(
                "Prompt", f"{m.metadata.name}@{m.spec.version}", loaded.source, changed
            )
        if isinstance(m, McpServerManifest):
            changed = False
            if not dry_run:
                changed = await self.store.put_mcp_server(m.metadata.name, m.spec, actor=actor)
            return ApplyOutcome("McpServer", m.metadata.name, loaded.source, changed)
        if isinstance(m, ReleaseManifest):
            changed = False
            if not dry_run:
                changed = await self.store.put_release(m.metadata.name, m.spec, actor=actor)
            return ApplyOutcome("Release", m.metadata.name, loaded.source, changed)
        raise TypeError(f"unsupported manifest {type(m).__name__}")

    async def _apply_agent(
        self,
        loaded: LoadedManifest,
        m: AgentManifest,
        actor: str,
        expected_revision: int | None,
        dry_run: bool,
    ) -> ApplyOutcome:
        name = m.metadata.name
        spec_json = m.spec.model_dump(mode="json")
        self._check_references(name, m.spec, loaded.source)
        warnings = await self._warnings(name, m.spec, loaded.source)
        replacements: dict[Path, str] = {}
        moved: list[str] = []
        for path, value in iter_secrets(m.spec):
            if is_reference(value):
                continue
            ref = secret_ref_for(name, path, spec_json, mount=self.kv_mount)
            if not dry_run:
                await self.vault.write(ref, value)
            replacements[path] = str(ref)
            moved.append(format_path(path))
        spec = AgentSpec.model_validate(replace_values(spec_json, replacements))
        if dry_run:
            return ApplyOutcome(
                "Agent", name, loaded.source, False, warnings=warnings, secrets_moved=moved
            )
        refs = [VaultRef.parse(v) for _, v in iter_secrets(spec)]
        own = agent_secret_prefix(name) + "/"
        extra = [r for r in refs if not (r.mount == self.kv_mount and r.path.startswith(own))]
        await self.vault.put_policy(
            agent_policy_name(name), agent_policy(name, mount=self.kv_mount, extra_refs=extra)
        )
        result = await self.store.apply_agent(
            name, spec, actor=actor, expected_revision=expected_revision
        )
        for w in warnings:
            logger.warning("%s: %s", name, w)
        return ApplyOutcome(
            "Agent", name, loaded.source, result.changed, result.revision, result, warnings, moved
        )

    def _check_references(self, name: str, spec: AgentSpec, source: str) -> None:
        """A spec may not point at another agent's secrets."""
        own = agent_secret_prefix(name) + "/"
        issues = []
        for path, value in iter_secrets(spec):
            if not is_reference(value):
                continue
            ref = VaultRef.parse(value)
            if ref.path.startswith("specmesh/agents/") and not ref.path.startswith(own):
                issues.append(
                    SpecIssue(
                        f"spec.{format_path(path)}",
                        "foreign_secret",
                        f"refers to another agent's secret ({value}); an agent may only use "
                        f"secrets under {self.kv_mount}/{own}* or outside specmesh/agents/",
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
