"""The control plane's one implementation of its API; REST and gRPC both call it.

Every method takes the calling :class:`~control_plane.auth.Principal` first, checks its
permission (deny by default) and records the principal as the actor of every change
(the store writes the audit entry in the same transaction as the change). List calls
(``*_page``) filter and page here (:mod:`control_plane.paging`), once for every transport.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from control_plane.auth import PERMISSIONS, Principal, authorize
from control_plane.errors import BadRequestError, TrackEmptyError
from control_plane.issuer import CONTROL_PLANE_TREE, InvokeToken, TokenIssuer, subject_problem
from control_plane.mcptools import McpToolCatalog, ToolListing
from control_plane.mesh import IstioValidator, MeshSettings, render_agent
from control_plane.paging import Page, PageRequest, paginate
from control_plane.publisher import render_from_store
from control_plane.tokens import TokenRecord, TokenRequest, TokenStore, check_grant
from control_plane.traces import (
    GROUP_KEYS,
    InMemoryTraceStore,
    Span,
    TokenUsageRow,
    TraceStore,
    TraceSummary,
)
from specmesh.errors import (
    ConflictError,
    NotFoundError,
    SecretNotFoundError,
    SecretReferenceError,
    SpecError,
    SpecIssue,
)
from specmesh.names import resource_name
from specmesh.secrets import VaultRef
from specmesh.spec.diff import Change
from specmesh.spec.manifest import LoadedManifest, parse_manifest
from specmesh.spec.models import (
    API_VERSION,
    MAX_REPLICAS,
    CallersSpec,
    McpServerSpec,
    PromptEntry,
    PromptRelease,
    ReleaseSpec,
)
from specmesh.spec_apply import ApplyOutcome, SpecService
from specmesh.store import (
    AgentRecord,
    AgentSummary,
    AuditEntry,
    PromptHistory,
    ReleaseState,
    SpecStore,
)
from specmesh.vault import VaultClient
from specmesh.workloads import TRACKS, AgentStatus

__all__ = ["MASK", "AgentListing", "ControlPlane", "CredentialInfo", "Identity"]

MASK = "********"

_WRITE_ACTION = {
    "Agent": "agents.write",
    "Prompt": "prompts.write",
    "McpServer": "mcp.write",
    "Release": "releases.write",
}

CardFetcher = Callable[[Mapping[str, Any]], Awaitable[dict[str, Any]]]
"""``(registry entry of a live instance) -> its A2A agent card as JSON``."""

_READ_ACTION = {
    "Agent": "agents.read",
    "Prompt": "prompts.read",
    "PromptRelease": "prompts.read",
    "McpServer": "mcp.read",
    "Release": "releases.read",
    "Credential": "credentials.list",
}


@dataclass(frozen=True)
class CredentialInfo:
    reference: str
    mount: str
    path: str
    field: str
    version: int

    def to_json(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "mount": self.mount,
            "path": self.path,
            "field": self.field,
            "maskedValue": MASK,
            "version": self.version,
        }


@dataclass(frozen=True)
class Identity:
    """The calling principal as it sees itself."""

    name: str
    roles: list[str]
    """Its roles, sorted."""
    can: list[str]
    """The actions its roles allow, sorted."""


@dataclass(frozen=True)
class AgentListing:
    """An agent at its latest revision, with its observed state in short."""

    record: AgentRecord
    status: AgentStatus | None
    """None when the control plane runs no runtime (nothing runs agents); phase
    ``Pending`` while no controller reported on an agent applied a moment ago."""


class ControlPlane:
    """Agents, prompts, MCP Registry, Agent Registry, releases, credentials, audit, mesh."""

    def __init__(
        self,
        *,
        store: SpecStore,
        vault: VaultClient,
        kv_mount: str = "secret",
        mesh_settings: MeshSettings | None = None,
        istio: IstioValidator | None = None,
        mcp_tools: McpToolCatalog | None = None,
        card_fetcher: CardFetcher | None = None,
        traces: TraceStore | None = None,
        pki_mount: str | None = None,
        tokens: TokenStore | None = None,
        issuer: TokenIssuer | None = None,
        runtime: str = "none",
        infrastructure_secret: VaultRef | None = None,
    ) -> None:
        self.store = store
        self.vault = vault
        self.kv_mount = kv_mount
        self.specs = SpecService(
            store=store,
            vault=vault,
            kv_mount=kv_mount,
            pki_mount=pki_mount,
            infrastructure_secret=infrastructure_secret,
        )
        self.mesh_settings = mesh_settings or MeshSettings()
        self.istio = istio
        self.mcp_tools = mcp_tools
        """The MCP Registry's tool listings (None: tool discovery is off)."""
        self.card_fetcher = card_fetcher
        self.traces = traces or InMemoryTraceStore()
        self.tokens = tokens or TokenStore(store=store)
        self.issuer = issuer or TokenIssuer(vault=vault, kv_mount=kv_mount)
        """Mints invoke tokens (its signing key in Vault, under the control plane's tree)."""
        self.runtime = runtime
        """The runtime the controller drives (``none``: no controller runs)."""

    # ------------------------------------------------------------ manifests

    async def apply(
        self,
        principal: Principal,
        document: Any,
        *,
        expected_revision: int | None = None,
        dry_run: bool = False,
        source: str = "request",
        message: str = "",
    ) -> ApplyOutcome:
        """Apply one manifest document (any kind); ``message`` is stored with the audit
        entry (and an agent's revision)."""
        manifest = parse_manifest(document, source=source)
        authorize(principal, _WRITE_ACTION[manifest.kind])
        return await self.specs.apply(
            LoadedManifest(source, manifest),
            actor=principal.name,
            expected_revision=expected_revision,
            dry_run=dry_run,
            message=message,
        )

    async def whoami(self, principal: Principal) -> Identity:
        """Who the caller is and what it may do (any authenticated caller may ask)."""
        return Identity(
            name=principal.name,
            roles=sorted(str(r) for r in principal.roles),
            can=sorted(a for a in PERMISSIONS if principal.can(a)),
        )

    # ------------------------------------------------------------ agents

    async def list_agents(self, principal: Principal) -> list[AgentSummary]:
        authorize(principal, "agents.read")
        return await self.store.list_agents()

    async def get_agent(
        self, principal: Principal, name: str, revision: int | None = None
    ) -> AgentRecord:
        authorize(principal, "agents.read")
        return await self.store.get_agent(name, revision)

    async def agents_page(self, principal: Principal, page: PageRequest) -> Page[AgentListing]:
        """One page of the agents at their latest revision, by name, each with its
        observed state in short (see :class:`AgentListing`)."""
        summaries = sorted(await self.list_agents(principal), key=lambda s: s.name)
        listed = paginate(summaries, page)
        statuses = await self.agent_statuses(principal)
        out = []
        for summary in listed.items:
            try:
                record = await self.store.get_agent(summary.name, summary.revision)
            except NotFoundError:  # deleted since it was listed
                continue
            stored = statuses.get(resource_name(summary.name))
            status: AgentStatus | None = None
            if stored is not None:
                status = AgentStatus.from_json({"agent": summary.name, **stored})
            elif self.runtime != "none":  # applied a moment ago: the controller reports soon
                status = AgentStatus(
                    agent=summary.name,
                    revision=0,
                    runtime=self.runtime,
                    tracks={},
                    instances=[],
                    phase="Pending",
                )
            out.append(AgentListing(record, status))
        return Page(out, listed.next_page_token)

    async def history(self, principal: Principal, name: str) -> list[AgentRecord]:
        authorize(principal, "agents.read")
        return await self.store.history(name)

    async def revisions_page(
        self, principal: Principal, name: str, page: PageRequest
    ) -> Page[AgentRecord]:
        """One page of an agent's revisions, newest first."""
        return paginate(list(reversed(await self.history(principal, name))), page)

    async def diff(
        self, principal: Principal, name: str, a: int, b: int | None = None
    ) -> list[Change]:
        """The changes from revision ``a`` to revision ``b`` (None: the latest)."""
        authorize(principal, "agents.read")
        if b is None:
            b = (await self.store.get_agent(name)).revision
        return await self.store.diff(name, a, b)

    async def rollback(
        self,
        principal: Principal,
        name: str,
        revision: int,
        *,
        expected_revision: int | None = None,
        message: str = "",
    ) -> Any:
        authorize(principal, "agents.write")
        return await self.store.rollback(
            name,
            revision,
            actor=principal.name,
            expected_revision=expected_revision,
            message=message,
        )

    async def scale(
        self,
        principal: Principal,
        name: str,
        *,
        replicas: int,
        track: str = "stable",
        expected_revision: int | None = None,
    ) -> ApplyOutcome:
        """Set a track's replicas in the agent's ``deployment`` part: a new revision like any
        other change (the controller then starts or drains instances). Scaling the canary
        above 0 enables it; to 0, disables it."""
        authorize(principal, "agents.write")
        if track not in TRACKS:
            raise BadRequestError(f"track: must be one of {', '.join(TRACKS)} (got {track!r})")
        if isinstance(replicas, bool) or not 0 <= replicas <= MAX_REPLICAS:
            raise BadRequestError(f"replicas: must be 0 to {MAX_REPLICAS} (got {replicas!r})")
        record = await self.store.get_agent(name)
        spec = dict(record.spec)
        deployment = dict(spec.get("deployment") or {})
        tracks = dict(deployment.get("tracks") or {})
        entry = {**dict(tracks.get(track) or {}), "replicas": replicas}
        if track == "canary":
            entry["enabled"] = replicas > 0
        tracks[track] = entry
        spec["deployment"] = {**deployment, "tracks": tracks}
        document = {
            "apiVersion": API_VERSION,
            "kind": "Agent",
            "metadata": {"name": record.name},
            "spec": spec,
        }
        outcome = await self.specs.apply(
            LoadedManifest(
                f"scale {track} to {replicas}", parse_manifest(document, source="scale")
            ),
            actor=principal.name,
            expected_revision=record.revision if expected_revision is None else expected_revision,
        )
        if (spec["deployment"].get("autoscaling") or {}).get("enabled"):
            outcome.warnings.append(
                SpecIssue(
                    "deployment.autoscaling.enabled",
                    "autoscaling",
                    "autoscaling is on: it sets the replicas (between min and max), not this",
                    severity="warning",
                )
            )
        return outcome

    async def agent_status(self, principal: Principal, name: str) -> dict[str, Any]:
        """What runs of the agent, as the controller last observed it."""
        authorize(principal, "agents.read")
        await self.store.get_agent(name)  # 404 for an unknown agent
        status = await self.store.get_status(name)
        if status is None and self.runtime == "none":
            return {"agent": name, "phase": "NotRunning", "ready": "0/0", "tracks": {},
                    "instances": [], "lastError": "no controller reported on it: the control "
                    "plane runs no runtime (SPECMESH_RUNTIME)"}  # fmt: skip
        if status is None:  # applied a moment ago: the controller reports within seconds
            return {"agent": name, "phase": "Pending", "ready": "0/0", "tracks": {},
                    "instances": [], "lastError": None, "runtime": self.runtime}  # fmt: skip
        return status

    async def agent_statuses(self, principal: Principal) -> dict[str, dict[str, Any]]:
        """Resource name -> observed state of every agent the controller reported on."""
        authorize(principal, "agents.read")
        return await self.store.list_statuses()

    async def delete_agent(
        self, principal: Principal, name: str, *, expected_revision: int | None = None
    ) -> None:
        authorize(principal, "agents.write")
        await self.store.delete_agent(
            name, actor=principal.name, expected_revision=expected_revision
        )
        await self.specs.retire_identity(name)

    async def invoke_token(self, principal: Principal, name: str) -> InvokeToken:
        """A short-lived JWT that lets ``principal`` call the agent ``name`` through its public
        entry (``aud`` = the agent's resource name, ``sub`` = the principal's name); the
        agent's ``callers.principals`` must admit ``<issuer>/<principal>``. The mint is
        audited (who, which agent, the token's id and expiry), the token never. A principal
        whose name is no usable subject (``issuer.SUBJECT_RULE``: '/', '*', whitespace...)
        gets none: 400."""
        authorize(principal, "agents.invoke")
        problem = subject_problem(principal.name)
        if problem is not None:
            raise BadRequestError(f"invoke token: {problem}")
        record = await self.store.get_agent(name)  # 404 for an unknown agent
        minted = await self.issuer.mint(subject=principal.name, audience=resource_name(record.name))
        await self.store.record(
            actor=principal.name,
            action="invoke-token",
            kind="Agent",
            name=record.name,
            message=f"invoke token {minted.jti} for {minted.issuer}/{minted.subject}, "
            f"expires {minted.expires_at.isoformat()}",
        )
        return minted

    # ------------------------------------------------------------ prompts

    async def list_prompts(self, principal: Principal) -> dict[str, list[str]]:
        authorize(principal, "prompts.read")
        return await self.store.list_prompts()

    async def prompts_page(
        self, principal: Principal, page: PageRequest
    ) -> Page[tuple[str, list[str]]]:
        """One page of (promptKey, its versions), by promptKey."""
        return paginate(sorted((await self.list_prompts(principal)).items()), page)

    async def get_prompt(
        self, principal: Principal, key: str
    ) -> tuple[list[PromptEntry], PromptRelease | None]:
        authorize(principal, "prompts.read")
        versions = await self.store.list_prompt_versions(key)
        if not versions:
            raise NotFoundError(kind="prompt", name=key)
        return versions, await self.store.get_prompt_release(key)

    async def set_prompt_release(
        self, principal: Principal, key: str, release: PromptRelease, *, message: str = ""
    ) -> None:
        authorize(principal, "prompts.write")
        await self.store.set_prompt_release(key, release, actor=principal.name, message=message)

    async def rollback_prompt(
        self, principal: Principal, key: str, version: str, *, message: str = ""
    ) -> PromptRelease:
        """Serve ``version`` of prompt ``key`` again (as set_prompt_release may)."""
        authorize(principal, "prompts.write")
        return await self.store.rollback_prompt(key, version, actor=principal.name, message=message)

    async def prompt_history(self, principal: Principal, key: str) -> PromptHistory:
        authorize(principal, "prompts.read")
        return await self.store.prompt_history(key)

    # ------------------------------------------------------------ registries

    async def list_mcp_servers(self, principal: Principal) -> dict[str, Any]:
        authorize(principal, "mcp.read")
        return await self.store.list_mcp_servers()

    async def mcp_servers_page(
        self, principal: Principal, page: PageRequest
    ) -> Page[tuple[str, McpServerSpec]]:
        """One page of the MCP Registry's entries, by name."""
        return paginate(sorted((await self.list_mcp_servers(principal)).items()), page)

    async def list_mcp_tools(self, principal: Principal, name: str) -> Any:
        """The tools a registered MCP server really offers (by connecting to it now, with
        the credentials a sidecar would add)."""
        authorize(principal, "mcp.read")
        if self.mcp_tools is None:
            await self.store.get_mcp_server(name)  # 404 first
            raise BadRequestError("tool discovery is not configured on this control plane")
        listing = await self.mcp_tools.refresh(name)
        if listing.error is not None:
            raise BadRequestError(listing.error)
        return [dict(t) for t in listing.tools]

    async def mcp_tools_page(
        self, principal: Principal, name: str, page: PageRequest
    ) -> Page[dict[str, Any]]:
        """One page of :meth:`list_mcp_tools`, in the server's order."""
        return paginate(await self.list_mcp_tools(principal, name), page)

    async def mcp_tool_listings(self, principal: Principal) -> dict[str, dict[str, Any]]:
        """Each MCP Registry entry's tools as last listed (refreshed on a schedule and on
        change), with when and the last error; entries not listed yet are absent."""
        authorize(principal, "mcp.read")
        if self.mcp_tools is None:
            return {}
        return {n: listing.to_json() for n, listing in sorted(self.mcp_tools.listings().items())}

    async def mcp_tool_listings_page(
        self, principal: Principal, page: PageRequest
    ) -> Page[tuple[str, ToolListing]]:
        """One page of :meth:`mcp_tool_listings`, as listings, by server name."""
        authorize(principal, "mcp.read")
        listings = self.mcp_tools.listings() if self.mcp_tools is not None else {}
        return paginate(sorted(listings.items()), page)

    async def list_instances(
        self, principal: Principal, agent: str | None = None
    ) -> list[dict[str, Any]]:
        authorize(principal, "registry.read")
        return await self.store.list_instances(agent)

    async def instances_page(
        self, principal: Principal, agent: str | None, page: PageRequest
    ) -> Page[dict[str, Any]]:
        """One page of the live instances (of ``agent``, or all), by agent then instance."""
        found = await self.list_instances(principal, agent)
        found.sort(key=lambda i: (str(i.get("agent", "")), str(i.get("instance", ""))))
        return paginate(found, page)

    # ------------------------------------------------------------ releases

    async def get_release(self, principal: Principal, agent: str) -> ReleaseState:
        """The agent's release policy (None: it has none) and its version (0: none)."""
        authorize(principal, "releases.read")
        await self.store.get_agent(agent)  # 404 for an unknown agent
        return await self.store.get_release_state(agent)

    async def release_analysis(self, principal: Principal, agent: str) -> dict[str, Any] | None:
        """The progress of the agent's release analysis (see :mod:`control_plane.analysis_loop`);
        None when none ran. The loop's bookkeeping (``window``: the sidecars' counts at the
        step's start, per instance) is left out."""
        authorize(principal, "releases.read")
        state = await self.store.get_analysis(agent)
        if state is None:
            return None
        return {k: v for k, v in state.items() if k != "window"}

    async def set_release(
        self,
        principal: Principal,
        agent: str,
        spec: ReleaseSpec,
        *,
        dry_run: bool = False,
        message: str = "",
        allow_empty: bool = False,
        expected_version: int | None = None,
    ) -> ReleaseState:
        """Create or replace the release policy. Refused (:class:`TrackEmptyError`) when
        it sends calls to a track with no ready instance, unless ``allow_empty``; a
        :class:`ConflictError` when ``expected_version`` is not the policy's version."""
        authorize(principal, "releases.write")
        await self.store.get_agent(agent)  # 404 for an unknown agent before anything else
        version = (await self.store.get_release_state(agent)).version
        _expect_version(agent, expected_version, version)
        if dry_run:  # the revisions it names must exist; nothing is written
            for revision in (spec.stable_revision, spec.canary_revision):
                await self.store.get_agent(agent, revision)
        if not allow_empty:
            await self._check_tracks(agent, spec)
        if dry_run:
            return ReleaseState(spec, version)
        return await self.store.put_release(
            agent,
            spec,
            actor=principal.name,
            message=message,
            action="set",
            expected_version=expected_version,
        )

    async def _check_tracks(self, agent: str, spec: ReleaseSpec) -> None:
        """Refuse ``spec`` if it sends calls to a track the controller last saw with no
        ready instance, or if no status of the agent was seen at all."""
        sends = []
        canary = [f"{spec.canary_weight}% of calls"] if spec.canary_weight else []
        if spec.header_match:
            canary.append("the calls matching its headerMatch")
        if canary:
            sends.append(("canary", " and ".join(canary)))
        if spec.canary_weight < 100:
            sends.append(("stable", f"{100 - spec.canary_weight}% of calls"))
        status = await self.store.get_status(agent)
        observed = AgentStatus.from_json({"agent": agent, **status}) if status else None
        tracks = observed.tracks if observed else {}
        age = _age_seconds(observed.observed_at) if observed else None
        if age is not None and age > STATUS_STALE_SECONDS:
            status = None  # as good as none: the controller stopped observing
        for track, share in sends:
            advice = ""
            if track == "canary":
                advice = (
                    "a release naming a canary revision starts the canary track: set the "
                    f"canary revision at weight 0 first (`specmesh release set {agent} "
                    f"--canary-revision {spec.canary_revision} --weight 0`), wait until "
                    "`specmesh get agents` shows its canary ready, then raise the weight"
                )
            if status is None:
                if age is not None:
                    unobserved = (
                        f"the controller last observed it {age:.0f} s ago (more than "
                        f"{STATUS_STALE_SECONDS} s): is the control plane's controller running?"
                    )
                elif self.runtime == "none":
                    unobserved = "the control plane runs no controller (SPECMESH_RUNTIME=none)"
                else:
                    unobserved = (
                        "the controller has not reported on the agent yet (it does within "
                        "seconds of an apply): retry then"
                    )
                raise TrackEmptyError(
                    agent=agent,
                    track=track,
                    share=share,
                    ready=None,
                    desired=None,
                    advice=advice,
                    unobserved=unobserved,
                )
            counts = tracks.get(track)
            ready, desired = (counts.ready, counts.desired) if counts else (0, 0)
            if ready == 0:
                raise TrackEmptyError(
                    agent=agent,
                    track=track,
                    share=share,
                    ready=ready,
                    desired=desired,
                    advice=advice,
                )

    async def promote(
        self,
        principal: Principal,
        agent: str,
        *,
        message: str = "",
        details: dict[str, Any] | None = None,
        expected_version: int | None = None,
    ) -> ReleaseState:
        """The canary becomes stable; the split ends (``details``: why, when the release
        analysis decided it)."""
        return await self._end_split(
            principal,
            agent,
            message=message,
            action="promote",
            details=details,
            expected_version=expected_version,
        )

    async def abort(
        self,
        principal: Principal,
        agent: str,
        *,
        message: str = "",
        action: str = "abort",
        details: dict[str, Any] | None = None,
        expected_version: int | None = None,
    ) -> ReleaseState:
        """The split ends; stable stays. ``action`` is ``abort`` or ``auto-abort`` (the
        analysis loop's, with the figures that failed in ``details``); never refused for
        an empty track: it only moves calls back to stable."""
        if action not in ("abort", "auto-abort"):
            raise ValueError(f"abort action {action!r}: not abort or auto-abort")
        return await self._end_split(
            principal,
            agent,
            message=message,
            action=action,
            details=details,
            expected_version=expected_version,
        )

    async def _end_split(
        self,
        principal: Principal,
        agent: str,
        *,
        message: str,
        action: str,
        details: dict[str, Any] | None = None,
        expected_version: int | None = None,
    ) -> ReleaseState:
        """No canary any more (``promote``: it becomes stable first); a SpecError when the
        agent has no canary. The write is guarded by the version read here (or
        ``expected_version``), so a concurrent change is a ConflictError, never lost."""
        authorize(principal, "releases.write")
        state = await self.store.get_release_state(agent)
        _expect_version(agent, expected_version, state.version)
        current = state.spec
        if current is None or current.canary_revision is None:
            raise SpecError([SpecIssue("release", "no_canary", f"agent {agent!r} has no canary")])
        update: dict[str, Any] = {"canary_revision": None, "canary_weight": 0, "header_match": []}
        if action == "promote":
            update["stable_revision"] = current.canary_revision
        ended = current.model_copy(update=update)
        return await self.store.put_release(
            agent,
            ended,
            actor=principal.name,
            message=message,
            action=action,
            expected_version=state.version,
            details=details,
        )

    # ------------------------------------------------------------ secret versions

    async def collect_garbage(self, principal: Principal, *, grace_seconds: float) -> Any:
        """Destroy KV versions no revision references (see
        :meth:`specmesh.spec_apply.SpecService.collect_garbage`)."""
        authorize(principal, "secrets.gc")
        if isinstance(grace_seconds, bool) or not 60 <= grace_seconds <= 10**7:
            # at least a minute: an apply between its Vault write and its etcd transaction
            # keeps its new version
            raise BadRequestError(
                f"grace_seconds: must be 60 to 10000000 seconds (got {grace_seconds!r})"
            )
        report = await self.specs.collect_garbage(grace_seconds=grace_seconds)
        await self.store.record(
            actor=principal.name,
            action="gc",
            kind="Credential",
            name="specmesh/agents",
            message=f"destroyed {len(report.destroyed)} unreferenced versions",
        )
        return report.to_json()

    # ------------------------------------------------------------ grants

    def _shareable(self, secret: str) -> tuple[str, str]:
        """``(mount, path)`` of a secret a secrets-admin may share: ``vault://<mount>/<path>``
        (a ``#field`` and ``@version`` are ignored) in the KV mount, outside every agent's
        own tree."""
        text = secret if "#" in secret else f"{secret}#_"
        try:
            ref = VaultRef.parse(text)
        except SecretReferenceError as e:
            raise BadRequestError(f"secret: {e.reason}") from None
        bad_mount = self.specs.check_location(ref)
        if bad_mount:
            raise BadRequestError(f"secret: {bad_mount}")
        if ref.path.startswith("specmesh/agents/"):
            raise BadRequestError(
                "secret: an agent's own secrets are never shared with another agent"
            )
        if _in_control_plane_tree(ref.path):
            raise BadRequestError(
                f"secret: the control plane's own secrets ({CONTROL_PLANE_TREE}/) are never shared"
            )
        return ref.mount, ref.path

    async def share_secret(self, principal: Principal, agent: str, secret: str) -> dict[str, Any]:
        """Let ``agent`` reference ``secret`` (a grant in etcd, audited) and rewrite its
        Vault policy to read it."""
        authorize(principal, "grants.write")
        mount, path = self._shareable(secret)
        await self.store.put_grant(agent, mount, path, actor=principal.name)
        await self.specs.write_identity(agent)
        return {"agent": agent, "secret": f"vault://{mount}/{path}"}

    async def unshare_secret(self, principal: Principal, agent: str, secret: str) -> str:
        """End a grant; the agent's policy no longer reads the secret. Returns the secret
        as ``vault://<mount>/<path>``."""
        authorize(principal, "grants.write")
        mount, path = self._shareable(secret)
        await self.store.delete_grant(agent, mount, path, actor=principal.name)
        await self.specs.write_identity(agent)  # shared before the agent existed: still revoked
        return f"vault://{mount}/{path}"

    async def list_grants(
        self, principal: Principal, agent: str | None = None
    ) -> list[dict[str, Any]]:
        authorize(principal, "grants.read")
        return [
            {**g, "secret": f"vault://{g['mount']}/{g['path']}"}
            for g in await self.store.list_grants(agent)
        ]

    async def grants_page(
        self, principal: Principal, agent: str | None, page: PageRequest
    ) -> Page[dict[str, Any]]:
        """One page of the grants (of ``agent``, or every agent's), by agent then secret."""
        grants = await self.list_grants(principal, agent)
        grants.sort(key=lambda g: (str(g["agent"]), str(g["secret"])))
        return paginate(grants, page)

    # ------------------------------------------------------------ credentials

    async def put_credential(
        self, principal: Principal, *, path: str, field: str, value: str, mount: str | None = None
    ) -> CredentialInfo:
        """Write a value into Vault; only the reference comes back."""
        authorize(principal, "credentials.write")
        if not value:
            raise BadRequestError("value: must not be empty")
        try:
            ref = VaultRef.parse(f"vault://{mount or self.kv_mount}/{path}#{field}")
        except SecretReferenceError as e:
            raise BadRequestError(f"path: {e.reason}") from None
        bad_mount = self.specs.check_location(ref)
        if bad_mount:
            raise BadRequestError(f"mount: {bad_mount}")
        if not ref.path.startswith("specmesh/") or ref.path.startswith("specmesh/agents/"):
            raise BadRequestError(
                "path: credentials are written under specmesh/ outside specmesh/agents/ (an "
                "agent's own keys change only by applying its spec, as new versions)"
            )
        if _in_control_plane_tree(ref.path):
            raise BadRequestError(
                f"path: {CONTROL_PLANE_TREE}/ holds the control plane's own keys (its token "
                "signing key); they are not written through the API"
            )
        await self.vault.write(ref, value)
        _, version = await self.vault.read_fields(mount=ref.mount, path=ref.path)
        await self.store.record(
            actor=principal.name,
            action="put",
            kind="Credential",
            name=str(ref),
            message="value written to Vault (not recorded)",
        )
        return CredentialInfo(str(ref), ref.mount, ref.path, ref.field, version)

    async def list_credentials(
        self, principal: Principal, *, prefix: str = "specmesh", mount: str | None = None
    ) -> list[CredentialInfo]:
        """References under ``prefix`` with masked values (values are write-only)."""
        authorize(principal, "credentials.list")
        mount = mount or self.kv_mount
        out: list[CredentialInfo] = []
        pending = [_credential_folder(prefix, mount)]
        while pending:
            folder = pending.pop()
            for key in await self.vault.list_keys(mount=mount, path=folder):
                path = f"{folder}/{key}".strip("/")
                if key.endswith("/"):
                    pending.append(path.rstrip("/"))
                    continue
                try:
                    fields, version = await self.vault.read_fields(mount=mount, path=path)
                except SecretNotFoundError:
                    continue  # its latest version was deleted or destroyed (e.g. by gc)
                out.extend(
                    CredentialInfo(f"vault://{mount}/{path}#{f}", mount, path, f, version)
                    for f in fields
                )
        return sorted(out, key=lambda c: c.reference)

    async def credentials_page(
        self,
        principal: Principal,
        *,
        path_prefix: str = "",
        mount: str | None = None,
        page: PageRequest,
    ) -> Page[CredentialInfo]:
        """One page of the credentials whose path starts with ``path_prefix`` (empty: all,
        under ``specmesh/``), by reference."""
        prefix = path_prefix.lstrip("/")
        folder = prefix.rpartition("/")[0]  # list the folder, keep the paths starting with prefix
        found = await self.list_credentials(principal, prefix=folder, mount=mount)
        return paginate([c for c in found if c.path.startswith(prefix)], page)

    # ------------------------------------------------------------ added for the gRPC API

    async def get_mcp_server(self, principal: Principal, name: str) -> McpServerSpec:
        authorize(principal, "mcp.read")
        return await self.store.get_mcp_server(name)

    async def get_agent_card(self, principal: Principal, agent: str) -> dict[str, Any]:
        """The A2A card of a live instance of ``agent`` (a stable one when there is one)."""
        authorize(principal, "registry.read")
        instances = await self.store.list_instances(agent)
        if not instances:
            raise NotFoundError(kind="live instance of agent", name=agent)
        instances.sort(key=lambda i: (i.get("track", "stable") != "stable", str(i["instance"])))
        for instance in instances:  # the sidecars publish their engine's card in the registry
            card = instance.get("card")
            if isinstance(card, dict):
                return card
        if self.card_fetcher is None:
            raise NotFoundError(kind="agent card of a live instance of agent", name=agent)
        return await self.card_fetcher(instances[0])

    async def last_changes(self, principal: Principal, kind: str) -> dict[str, AuditEntry]:
        """Object name -> the newest audit entry of that kind about it (who changed it last,
        and when); readable by whoever may read objects of that kind."""
        authorize(principal, _READ_ACTION.get(kind, ""))
        latest: dict[str, AuditEntry] = {}
        for entry in await self.store.audit_entries(kind=kind, limit=sys.maxsize):
            latest.setdefault(entry.name, entry)  # newest first
        return latest

    # ------------------------------------------------------------ API tokens

    async def create_token(
        self, principal: Principal, request: TokenRequest
    ) -> tuple[str, TokenRecord]:
        """Mint a token: its secret (returned only here, never stored) and its record. Its
        roles may not allow more than the caller may (:func:`control_plane.tokens.
        check_grant`)."""
        authorize(principal, "tokens.write")
        check_grant(principal, request.roles)
        return await self.tokens.create(request, actor=principal.name)

    async def list_tokens(self, principal: Principal) -> list[TokenRecord]:
        """Every token (the token file's and the API's) with its state; never a secret."""
        authorize(principal, "tokens.read")
        return await self.tokens.list()

    async def tokens_page(self, principal: Principal, page: PageRequest) -> Page[TokenRecord]:
        """One page of the tokens, by id."""
        return paginate(sorted(await self.list_tokens(principal), key=lambda t: t.id), page)

    async def revoke_token(self, principal: Principal, token_id: str) -> TokenRecord:
        """Refuse the token from now on (every replica, within the watch's latency)."""
        authorize(principal, "tokens.write")
        return await self.tokens.revoke(token_id, actor=principal.name)

    # ------------------------------------------------------------ traces

    async def list_traces(
        self,
        principal: Principal,
        *,
        agent: str | None = None,
        context_id: str | None = None,
        since: datetime | None = None,
        limit: int = 50,
    ) -> list[TraceSummary]:
        authorize(principal, "traces.read")
        return await self.traces.list_traces(
            agent=agent, context_id=context_id, since=since, limit=limit
        )

    async def traces_page(
        self,
        principal: Principal,
        *,
        agent: str | None = None,
        context_id: str | None = None,
        since: datetime | None = None,
        page: PageRequest,
    ) -> Page[TraceSummary]:
        """One page of the traces, newest first."""
        traces = await self.list_traces(
            principal, agent=agent, context_id=context_id, since=since, limit=page.end + 1
        )
        return paginate(traces, page)

    async def get_trace(self, principal: Principal, trace_id: str) -> list[Span]:
        """Every span of a trace, ordered by start, with parent ids (a waterfall)."""
        authorize(principal, "traces.read")
        if len(trace_id) != 32 or any(c not in "0123456789abcdefABCDEF" for c in trace_id):
            raise BadRequestError(f"traceId: must be 32 hex digits (got {trace_id!r})")
        spans = await self.traces.get_trace(trace_id)
        if not spans:
            raise NotFoundError(kind="trace", name=trace_id)
        return spans

    async def token_usage(
        self,
        principal: Principal,
        *,
        group_by: Sequence[str] = GROUP_KEYS,
        since: datetime | None = None,
    ) -> list[TokenUsageRow]:
        authorize(principal, "traces.read")
        return await self.traces.token_usage(group_by=group_by, since=since)

    # ------------------------------------------------------------ audit, mesh

    async def audit(
        self,
        principal: Principal,
        *,
        name: str | None = None,
        kind: str | None = None,
        limit: int = 100,
    ) -> list[AuditEntry]:
        authorize(principal, "audit.read")
        return await self.store.audit_entries(name=name, kind=kind, limit=limit)

    async def audit_page(
        self,
        principal: Principal,
        *,
        name: str | None = None,
        kind: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        page: PageRequest,
    ) -> Page[AuditEntry]:
        """One page of the audit entries about ``name`` of ``kind`` made at or after
        ``since`` and before ``until`` (None: no bound), newest first."""
        entries = await self.audit(principal, name=name, kind=kind, limit=sys.maxsize)
        if since is not None or until is not None:
            entries = [
                e
                for e in entries
                if (since is None or _aware(e.time) >= since)
                and (until is None or _aware(e.time) < until)
            ]
        return paginate(entries, page)

    async def render_mesh(self, principal: Principal) -> list[dict[str, Any]]:
        """The Istio objects the current state publishes, validated when a CRD file is set."""
        authorize(principal, "mesh.read")
        objects = await render_from_store(self.store, self.mesh_settings)
        if self.istio is not None:
            self.istio.check(objects)
        return objects

    # ------------------------------------------------------------ added for the Studio

    async def preview_release(
        self, principal: Principal, agent: str, spec: ReleaseSpec
    ) -> dict[str, list[dict[str, Any]]]:
        """The Istio objects of ``agent`` now, and those ``spec`` would publish (validated);
        nothing is written. The agent and the revisions ``spec`` names must exist."""
        authorize(principal, "releases.read")
        for revision in (None, spec.stable_revision, spec.canary_revision):
            await self.store.get_agent(agent, revision)
        graph = await self.store.partner_graph()
        callers = [a for a, partners in graph.items()
                   if resource_name(agent) in {resource_name(p) for p in partners}]  # fmt: skip
        current_release = await self.store.get_release(agent)
        raw_callers = (await self.store.get_agent(agent)).spec.get("base", {}).get("callers")
        callers_spec = CallersSpec.model_validate(raw_callers) if raw_callers else None

        def render(release: ReleaseSpec | None) -> list[dict[str, Any]]:
            return render_agent(
                agent,
                release=release,
                callers=callers,
                settings=self.mesh_settings,
                callers_spec=callers_spec,
            )

        proposed = render(spec)
        if self.istio is not None:
            self.istio.check(proposed)
        return {"current": render(current_release), "proposed": proposed}

    async def prompt_stats(
        self, principal: Principal, key: str, *, since: datetime | None = None, limit: int = 200
    ) -> list[dict[str, Any]]:
        """Per version of prompt ``key``, the figures of the turns it served (from the
        ``invoke_agent`` spans of the newest ``limit`` traces): requests, errors, tokens,
        latency (p50, p95, ms)."""
        authorize(principal, "prompts.read")
        authorize(principal, "traces.read")
        turns: dict[str, list[Span]] = {}
        for summary in await self.traces.list_traces(since=since, limit=limit):
            for span in await self.traces.get_trace(summary.trace_id):
                attrs = span.attributes
                if span.operation == "invoke_agent" and attrs.get("specmesh.prompt.key") == key:
                    turns.setdefault(str(attrs.get("specmesh.prompt.version")), []).append(span)
        out = []
        for version, spans in sorted(turns.items()):
            latencies = sorted(s.duration_ns / 1e6 for s in spans)
            out.append(
                {
                    "version": version,
                    "requests": len(spans),
                    "errors": sum(1 for s in spans if s.is_error),
                    "inputTokens": sum(s.input_tokens or 0 for s in spans),
                    "outputTokens": sum(s.output_tokens or 0 for s in spans),
                    "latencyP50Ms": _quantile(latencies, 0.5),
                    "latencyP95Ms": _quantile(latencies, 0.95),
                    "agents": sorted({s.agent for s in spans}),
                }
            )
        return out


_CREDENTIALS_ROOT = "specmesh"


def _in_control_plane_tree(path: str) -> bool:
    return path == CONTROL_PLANE_TREE or path.startswith(f"{CONTROL_PLANE_TREE}/")


def _credential_folder(prefix: str, mount: str) -> str:
    """The folder ``prefix`` names, checked like a reference's path and kept under
    ``specmesh/`` (the tree apply writes): a ``..`` would walk the control plane's own
    token out of it (``../../sys/policies/acl``)."""
    try:
        VaultRef.parse(f"vault://{mount}/{_CREDENTIALS_ROOT}#x")
    except SecretReferenceError as e:
        raise BadRequestError(f"mount: {e.reason}") from None
    folder = prefix.strip("/") or _CREDENTIALS_ROOT
    try:
        VaultRef.parse(f"vault://{mount}/{folder}#x")
    except SecretReferenceError as e:
        raise BadRequestError(f"prefix: {e.reason}") from None
    if folder.split("/")[0] != _CREDENTIALS_ROOT:
        raise BadRequestError(
            f"prefix: must be {_CREDENTIALS_ROOT!r} or a folder under "
            f"'{_CREDENTIALS_ROOT}/' (got {prefix!r})"
        )
    return folder


STATUS_STALE_SECONDS = 60
"""An agent status observed longer ago than this is treated as unknown by the release
checks (the controller observes every 2 s by default)."""


def _age_seconds(iso: str) -> float | None:
    """Seconds since an ISO 8601 time of the store; None when it is empty or malformed."""
    try:
        return (datetime.now(UTC) - _aware(iso)).total_seconds() if iso else None
    except ValueError:
        return None


def _expect_version(agent: str, expected: int | None, actual: int) -> None:
    """A ConflictError unless ``expected`` (None: anything) is the release's version; the
    write's transaction compares it again."""
    if expected is not None and expected != actual:
        raise ConflictError(
            kind="release", name=agent, expected=expected, actual=actual, counter="version"
        )


def _aware(iso: str) -> datetime:
    """An ISO 8601 time of the store, as an aware datetime (UTC when it names no zone)."""
    moment = datetime.fromisoformat(iso)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank quantile of an ascending, non-empty sequence."""
    return round(ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))], 3)
