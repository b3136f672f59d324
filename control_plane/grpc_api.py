"""The gRPC API (grpc.aio): the same :class:`~control_plane.api.ControlPlane` as REST.

One servicer per service of ``proto/specmesh/v1/control_plane.proto``. Every RPC goes
through :meth:`_Service._run`: the ``authorization`` metadata is authenticated by the same
:class:`~control_plane.auth.Authenticator` as REST (``Bearer <token>``), one ControlPlane
method does the work (and checks the role), and what it returns is converted to messages
here -- no API logic lives in this module, only the wire mapping.

Errors take their code from :func:`control_plane.errors.status_for` (the one table REST
uses too); the details are the error's message, and for a :class:`SpecError` its issues
as ``path: message`` lines; the trailing metadata ``specmesh-error-reason`` carries the
table's reason (``invalid_spec``, ``permission_denied``...). An unexpected error is
logged and answered INTERNAL without its text.

Specs travel as JSON strings, times as ``Timestamp`` (from the store's ISO strings); an
agent's observed state (GetAgentStatus, and its short form in ListAgents) is typed. List
calls page over the in-memory list the ControlPlane returns: ``page_token`` is an opaque
offset. gRPC health answers SERVING for ``""`` and every service, and reflection lists
every service.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from control_plane.api import MASK, ControlPlane, CredentialInfo
from control_plane.auth import Authenticator, Principal
from control_plane.errors import BadRequestError, status_for
from specmesh import jsonbounds
from specmesh.errors import NotFoundError, SpecError
from specmesh.names import resource_name
from specmesh.spec.diff import Change
from specmesh.spec.manifest import MAX_NESTING_DEPTH, parse_manifest
from specmesh.spec.models import McpServerSpec, PromptEntry, PromptRelease, ReleaseSpec
from specmesh.spec.validation import validate_model
from specmesh.store import AgentRecord, AuditEntry
from specmesh.v1 import common_pb2, control_plane_pb2, control_plane_pb2_grpc
from specmesh.workloads import AgentStatus

__all__ = ["DEFAULT_PAGE_SIZE", "MAX_PAGE_SIZE", "SERVICE_NAMES", "build_grpc_server"]

logger = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 100
"""Page size when a request's ``page_size`` is 0."""
MAX_PAGE_SIZE = 1000
"""Larger page sizes are reduced to this."""

SERVICE_NAMES: tuple[str, ...] = tuple(
    s.full_name for s in control_plane_pb2.DESCRIPTOR.services_by_name.values()
)
"""Full names of the control plane's services (``specmesh.v1.AgentService``...)."""

REASON_METADATA = "specmesh-error-reason"

_pb = control_plane_pb2
_T = TypeVar("_T")

_OPS = {
    "add": common_pb2.CHANGE_OP_ADD,
    "remove": common_pb2.CHANGE_OP_REMOVE,
    "replace": common_pb2.CHANGE_OP_REPLACE,
}
_STATES = {
    "starting": common_pb2.ENGINE_STATE_STARTING,
    "serving": common_pb2.ENGINE_STATE_SERVING,
    "degraded": common_pb2.ENGINE_STATE_DEGRADED,
    "failed": common_pb2.ENGINE_STATE_FAILED,
    "engine-down": common_pb2.ENGINE_STATE_DOWN,
}
_RELEASE_FIELDS = ("stableRevision", "canaryRevision", "canaryWeight", "headerMatch")


# ---------------------------------------------------------------- conversions


def _timestamp(iso: str | None) -> Timestamp | None:
    if not iso:
        return None
    moment = datetime.fromisoformat(iso)
    ts = Timestamp()
    ts.FromDatetime(moment if moment.tzinfo else moment.replace(tzinfo=UTC))
    return ts


def _change(change: Change | Mapping[str, Any]) -> Any:
    c = change.to_json() if isinstance(change, Change) else change
    return common_pb2.Change(
        path=c["path"],
        op=_OPS.get(c["op"], common_pb2.CHANGE_OP_UNSPECIFIED),
        old_json=json.dumps(c.get("old")) if c["op"] != "add" else "",
        new_json=json.dumps(c.get("new")) if c["op"] != "remove" else "",
    )


def _revision_info(record: AgentRecord) -> Any:
    return common_pb2.RevisionInfo(
        revision=record.revision,
        author=record.author,
        created_at=_timestamp(record.created_at),
        message=record.message,
    )


def _agent(record: AgentRecord) -> Any:
    return _pb.Agent(
        name=record.name, revision_info=_revision_info(record), spec_json=json.dumps(record.spec)
    )


def _status_summary(status: Mapping[str, Any]) -> Any:
    """The short form of a stored status (``get agents``' PHASE and READY)."""
    full = AgentStatus.from_json({"agent": "", **status})
    return _pb.AgentStatusSummary(phase=full.phase, **_counts(full))


def _counts(status: AgentStatus) -> dict[str, int]:
    return {
        "ready_replicas": sum(t.ready for t in status.tracks.values()),
        "desired_replicas": sum(t.desired for t in status.tracks.values()),
    }


def _agent_status(data: Mapping[str, Any]) -> Any:
    """An observed state as ``ControlPlane.agent_status`` returns it (the stored JSON)."""
    status = AgentStatus.from_json(dict(data))
    return _pb.AgentStatus(
        agent_name=status.agent,
        revision=status.revision,
        runtime=status.runtime,
        phase=status.phase,
        **_counts(status),
        tracks={
            name: _pb.TrackStatus(desired=t.desired, ready=t.ready)
            for name, t in status.tracks.items()
        },
        instances=[
            _pb.InstanceStatus(
                instance_id=i.instance,
                track=i.track,
                phase=i.phase,
                ready=i.ready,
                serving_revision=i.revision,
                restarts=i.restarts,
                last_error=i.last_error or "",
                since=_timestamp(i.since),
                endpoints=i.endpoints,
            )
            for i in status.instances
        ],
        last_error=status.last_error or "",
        observed_at=_timestamp(status.observed_at),
    )


def _who(entry: AuditEntry | None) -> dict[str, Any]:
    """``updated_by`` / ``updated_at`` from an object's newest audit entry."""
    if entry is None:
        return {}
    return {"updated_by": entry.actor, "updated_at": _timestamp(entry.time)}


def _mcp_server(name: str, spec: McpServerSpec, entry: AuditEntry | None) -> Any:
    return _pb.McpServer(name=name, spec_json=spec.model_dump_json(), **_who(entry))


def _release(agent: str, spec: ReleaseSpec, entry: AuditEntry | None) -> Any:
    header_match = []
    for h in spec.header_match:
        matches = {k: v for k in ("exact", "prefix", "regex") if (v := getattr(h, k)) is not None}
        header_match.append(_pb.HeaderMatch(name=h.name, **matches))
    return _pb.Release(
        agent_name=agent,
        stable_revision=spec.stable_revision,
        canary_revision=spec.canary_revision,
        canary_weight=spec.canary_weight,
        header_match=header_match,
        spec_json=spec.model_dump_json(),
        **_who(entry),
    )


def _credential(info: CredentialInfo, entry: AuditEntry | None) -> Any:
    return _pb.Credential(
        reference=info.reference,
        mount=info.mount,
        path=info.path,
        field=info.field,
        masked_value=MASK,
        version=info.version,
        **_who(entry),
    )


def _audit_entry(e: AuditEntry) -> Any:
    return _pb.AuditEntry(
        id=e.id,
        time=_timestamp(e.time),
        actor=e.actor,
        action=e.action,
        kind=e.kind,
        name=e.name,
        revision=e.revision or 0,
        changes=[_change(c) for c in e.changes],
        message=e.message,
    )


# ---------------------------------------------------------------- request helpers


def _json_object(text: str, field: str) -> dict[str, Any]:
    try:
        value = jsonbounds.loads(text, max_depth=MAX_NESTING_DEPTH)
    except jsonbounds.JsonTooDeepError as e:
        raise BadRequestError(f"{field}: {e}") from None
    except json.JSONDecodeError as e:
        raise BadRequestError(f"{field}: invalid JSON ({e})") from None
    if not isinstance(value, dict):
        raise BadRequestError(f"{field}: must be a JSON object")
    return value


def _manifest(text: str, kind: str) -> dict[str, Any]:
    """The request's manifest document; it must be of ``kind`` (validated by the apply)."""
    if not text:
        raise BadRequestError("manifest_json: required")
    doc = _json_object(text, "manifest_json")
    if doc.get("kind") != kind:
        raise BadRequestError(f"manifest_json: kind must be {kind!r} (got {doc.get('kind')!r})")
    return doc


def _required(value: str, field: str) -> str:
    if not value:
        raise BadRequestError(f"{field}: required")
    return value


def _revision(value: int, field: str) -> int:
    if value < 0:
        raise BadRequestError(f"{field}: must be >= 0 (got {value})")
    return value


def _optional(request: Any, field: str) -> int | None:
    if not request.HasField(field):
        return None
    return _revision(getattr(request, field), field)


def _page(items: Sequence[_T], page_size: int, page_token: str) -> tuple[list[_T], str]:
    """One page of ``items`` and the token of the next (empty on the last page)."""
    if page_size < 0:
        raise BadRequestError(f"page_size: must be >= 0 (got {page_size})")
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    offset = 0
    if page_token:
        try:
            kind, _, raw = base64.urlsafe_b64decode(page_token.encode()).decode().partition(":")
            offset = int(raw)
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise BadRequestError("page_token: not a token from a previous response") from None
        if kind != "offset" or offset < 0:
            raise BadRequestError("page_token: not a token from a previous response")
    end = offset + size
    token = base64.urlsafe_b64encode(f"offset:{end}".encode()).decode() if end < len(items) else ""
    return list(items[offset:end]), token


# ---------------------------------------------------------------- services

_PromptChanges = tuple[dict[str, AuditEntry], dict[str, AuditEntry]]
_Impl = Callable[[Any, Principal, Any], Awaitable[Any]]
_Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _rpc(impl: _Impl) -> _Handler:
    """Make ``impl(self, principal, request)`` a gRPC handler (authentication, errors)."""

    async def handler(self: _Service, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._run(impl, request, context)

    handler.__name__ = impl.__name__
    handler.__doc__ = impl.__doc__
    return handler


class _Service:
    def __init__(self, control_plane: ControlPlane, authenticator: Authenticator) -> None:
        self.cp = control_plane
        self._authenticator = authenticator

    async def _run(self, impl: _Impl, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            authorization = next(
                (v for k, v in context.invocation_metadata() or () if k == "authorization"), None
            )
            principal = self._authenticator.authenticate(authorization)
            return await impl(self, principal, request)
        except Exception as e:
            _, code, reason = status_for(e)
            if reason == "internal":
                logger.exception("gRPC %s.%s failed", type(self).__name__, impl.__name__)
                details = "internal error (see the control plane's log)"
            elif isinstance(e, SpecError):
                n = len(e.issues)
                lines = "\n".join(str(i) for i in e.issues)
                details = f"{n} problem{'s' if n != 1 else ''} in spec:\n{lines}"
            else:
                details = str(e)
        await context.abort(code, details, ((REASON_METADATA, reason),))


class _AgentService(_Service):
    @_rpc
    async def ApplyAgent(self, p: Principal, request: Any) -> Any:
        doc = _manifest(request.manifest_json, "Agent")
        outcome = await self.cp.apply(
            p,
            doc,
            expected_revision=_optional(request, "expected_revision"),
            dry_run=request.dry_run,
            source="manifest_json",
        )
        if request.dry_run:  # nothing written: the spec with its secrets moved does not exist
            agent = _pb.Agent(name=outcome.name)
        else:
            agent = _agent(await self.cp.get_agent(p, outcome.name, outcome.revision))
        changes = outcome.result.changes if outcome.result is not None else []
        return _pb.ApplyAgentResponse(
            agent=agent, changes=[_change(c) for c in changes], created_revision=outcome.changed
        )

    @_rpc
    async def GetAgent(self, p: Principal, request: Any) -> Any:
        name = _required(request.agent_name, "agent_name")
        record = await self.cp.get_agent(p, name, _revision(request.revision, "revision") or None)
        return _pb.GetAgentResponse(agent=_agent(record))

    @_rpc
    async def ListAgents(self, p: Principal, request: Any) -> Any:
        if request.label_selector:
            raise BadRequestError("label_selector: not supported yet (labels are not stored)")
        summaries = sorted(await self.cp.list_agents(p), key=lambda s: s.name)
        page, token = _page(summaries, request.page_size, request.page_token)
        statuses = await self.cp.agent_statuses(p)
        agents = []
        for summary in page:
            try:
                agent = _agent(await self.cp.get_agent(p, summary.name, summary.revision))
            except NotFoundError:  # deleted since it was listed
                continue
            status = statuses.get(resource_name(summary.name))
            if status is not None:
                agent.status.CopyFrom(_status_summary(status))
            agents.append(agent)
        return _pb.ListAgentsResponse(agents=agents, next_page_token=token)

    @_rpc
    async def DeleteAgent(self, p: Principal, request: Any) -> Any:
        name = _required(request.agent_name, "agent_name")
        await self.cp.delete_agent(
            p, name, expected_revision=_optional(request, "expected_revision")
        )
        return _pb.DeleteAgentResponse()

    @_rpc
    async def ListAgentRevisions(self, p: Principal, request: Any) -> Any:
        name = _required(request.agent_name, "agent_name")
        records = list(reversed(await self.cp.history(p, name)))
        page, token = _page(records, request.page_size, request.page_token)
        return _pb.ListAgentRevisionsResponse(
            revisions=[_revision_info(r) for r in page], next_page_token=token
        )

    @_rpc
    async def DiffAgentRevisions(self, p: Principal, request: Any) -> Any:
        name = _required(request.agent_name, "agent_name")
        if request.from_revision <= 0:
            raise BadRequestError("from_revision: required (a revision >= 1)")
        to = _revision(request.to_revision, "to_revision")
        if to == 0:
            to = (await self.cp.get_agent(p, name)).revision
        changes = await self.cp.diff(p, name, request.from_revision, to)
        return _pb.DiffAgentRevisionsResponse(changes=[_change(c) for c in changes])

    @_rpc
    async def RollbackAgent(self, p: Principal, request: Any) -> Any:
        name = _required(request.agent_name, "agent_name")
        if request.revision <= 0:
            raise BadRequestError("revision: required (a revision >= 1)")
        result = await self.cp.rollback(
            p, name, request.revision, expected_revision=_optional(request, "expected_revision")
        )
        record = await self.cp.get_agent(p, name, result.revision)
        return _pb.RollbackAgentResponse(
            agent=_agent(record), changes=[_change(c) for c in result.changes]
        )

    @_rpc
    async def GetAgentStatus(self, p: Principal, request: Any) -> Any:
        name = _required(request.agent_name, "agent_name")
        return _pb.GetAgentStatusResponse(status=_agent_status(await self.cp.agent_status(p, name)))

    @_rpc
    async def ScaleAgent(self, p: Principal, request: Any) -> Any:
        name = _required(request.agent_name, "agent_name")
        if not request.HasField("replicas"):
            raise BadRequestError("replicas: required, a whole number")
        outcome = await self.cp.scale(
            p,
            name,
            replicas=request.replicas,
            track=request.track or "stable",
            expected_revision=_optional(request, "expected_revision"),
        )
        record = await self.cp.get_agent(p, outcome.name, outcome.revision)
        changes = outcome.result.changes if outcome.result is not None else []
        return _pb.ScaleAgentResponse(
            agent=_agent(record),
            changes=[_change(c) for c in changes],
            created_revision=outcome.changed,
            warnings=[str(w) for w in outcome.warnings],
        )


class _PromptService(_Service):
    async def _changes(self, p: Principal) -> _PromptChanges:
        """Who published each ``key@version``, and who last set each key's release."""
        return await self.cp.last_changes(p, "Prompt"), await self.cp.last_changes(
            p, "PromptRelease"
        )

    async def _prompt(
        self,
        p: Principal,
        key: str,
        versions: list[str],
        release: PromptRelease | None,
        changes: _PromptChanges | None = None,
    ) -> tuple[Any, dict[str, AuditEntry]]:
        """The Prompt message, and version -> its publish audit entry."""
        publishes, releases = changes or await self._changes(p)
        published = {
            name.rpartition("@")[2]: e
            for name, e in publishes.items()
            if name.rpartition("@")[0] == key
        }
        released = releases.get(key)
        ordered = sorted(versions, key=lambda v: (published[v].time if v in published else "", v))
        entries = [*published.values(), *([released] if released else [])]
        newest = max(entries, key=lambda e: e.time, default=None)
        message = _pb.Prompt(prompt_key=key, versions=ordered, **_who(newest))
        if release is not None:
            message.release.labels.update(release.labels)
            message.release.weights.update(release.weights)
        return message, published

    @staticmethod
    def _version(entry: PromptEntry, published: Mapping[str, AuditEntry]) -> Any:
        e = published.get(entry.version)
        return _pb.PromptVersion(
            prompt_key=entry.prompt_key,
            version=entry.version,
            entry_json=entry.model_dump_json(),
            author=e.actor if e else "",
            created_at=_timestamp(e.time) if e else None,
        )

    @_rpc
    async def PublishPromptVersion(self, p: Principal, request: Any) -> Any:
        doc = _manifest(request.manifest_json, "Prompt")
        outcome = await self.cp.apply(p, doc, dry_run=request.dry_run, source="manifest_json")
        key, _, version = outcome.name.rpartition("@")
        if request.dry_run:
            spec = parse_manifest(doc, source="manifest_json").spec
            entry = PromptEntry.model_validate(
                {"promptKey": key, **spec.model_dump(mode="json", exclude={"release"})}
            )
            return _pb.PublishPromptVersionResponse(
                prompt_version=self._version(entry, {}), prompt=_pb.Prompt(prompt_key=key)
            )
        entries, release = await self.cp.get_prompt(p, key)
        prompt, published = await self._prompt(p, key, [e.version for e in entries], release)
        entry = next(e for e in entries if e.version == version)
        return _pb.PublishPromptVersionResponse(
            prompt_version=self._version(entry, published), prompt=prompt
        )

    @_rpc
    async def ListPrompts(self, p: Principal, request: Any) -> Any:
        prompts = sorted((await self.cp.list_prompts(p)).items())
        page, token = _page(prompts, request.page_size, request.page_token)
        changes = await self._changes(p)  # one audit read for the whole page
        out = []
        for key, versions in page:
            _, release = await self.cp.get_prompt(p, key)
            out.append((await self._prompt(p, key, versions, release, changes))[0])
        return _pb.ListPromptsResponse(prompts=out, next_page_token=token)

    @_rpc
    async def GetPrompt(self, p: Principal, request: Any) -> Any:
        key = _required(request.prompt_key, "prompt_key")
        entries, release = await self.cp.get_prompt(p, key)
        prompt, published = await self._prompt(p, key, [e.version for e in entries], release)
        if request.version:
            entries = [e for e in entries if e.version == request.version]
            if not entries:
                raise NotFoundError(kind="prompt version", name=f"{key}@{request.version}")
        order = list(prompt.versions)
        entries.sort(key=lambda e: order.index(e.version))
        return _pb.GetPromptResponse(
            prompt=prompt, versions=[self._version(e, published) for e in entries]
        )

    @_rpc
    async def SetPromptRelease(self, p: Principal, request: Any) -> Any:
        key = _required(request.prompt_key, "prompt_key")
        release = validate_model(
            PromptRelease,
            {"labels": dict(request.release.labels), "weights": dict(request.release.weights)},
            source="release",
        )
        await self.cp.set_prompt_release(p, key, release)
        entries, stored = await self.cp.get_prompt(p, key)
        prompt, _ = await self._prompt(p, key, [e.version for e in entries], stored)
        return _pb.SetPromptReleaseResponse(prompt=prompt)


class _McpRegistryService(_Service):
    @_rpc
    async def RegisterMcpServer(self, p: Principal, request: Any) -> Any:
        doc = _manifest(request.manifest_json, "McpServer")
        outcome = await self.cp.apply(p, doc, dry_run=request.dry_run, source="manifest_json")
        if request.dry_run:
            spec = parse_manifest(doc, source="manifest_json").spec
            return _pb.RegisterMcpServerResponse(mcp_server=_mcp_server(outcome.name, spec, None))
        spec = await self.cp.get_mcp_server(p, outcome.name)
        entry = (await self.cp.last_changes(p, "McpServer")).get(outcome.name)
        return _pb.RegisterMcpServerResponse(mcp_server=_mcp_server(outcome.name, spec, entry))

    @_rpc
    async def ListMcpServers(self, p: Principal, request: Any) -> Any:
        servers = sorted((await self.cp.list_mcp_servers(p)).items())
        page, token = _page(servers, request.page_size, request.page_token)
        changes = await self.cp.last_changes(p, "McpServer")
        return _pb.ListMcpServersResponse(
            mcp_servers=[_mcp_server(n, s, changes.get(n)) for n, s in page],
            next_page_token=token,
        )

    @_rpc
    async def GetMcpServer(self, p: Principal, request: Any) -> Any:
        name = _required(request.mcp_server_name, "mcp_server_name")
        spec = await self.cp.get_mcp_server(p, name)
        entry = (await self.cp.last_changes(p, "McpServer")).get(name)
        return _pb.GetMcpServerResponse(mcp_server=_mcp_server(name, spec, entry))

    @_rpc
    async def ListMcpServerTools(self, p: Principal, request: Any) -> Any:
        name = _required(request.mcp_server_name, "mcp_server_name")
        tools = await self.cp.list_mcp_tools(p, name)
        return _pb.ListMcpServerToolsResponse(
            tools=[
                _pb.McpTool(
                    name=t["name"],
                    description=t.get("description") or "",
                    input_schema_json=json.dumps(t.get("inputSchema") or {}),
                )
                for t in tools
            ]
        )


class _AgentRegistryService(_Service):
    @_rpc
    async def ListInstances(self, p: Principal, request: Any) -> Any:
        found = await self.cp.list_instances(p, request.agent_name or None)
        found.sort(key=lambda i: (str(i.get("agent", "")), str(i.get("instance", ""))))
        return _pb.ListInstancesResponse(
            instances=[
                _pb.AgentInstance(
                    agent_name=str(i.get("agent", "")),
                    instance_id=str(i.get("instance", "")),
                    endpoint=str(i.get("endpoint", "")),
                    track=str(i.get("track", "stable")),
                    serving_revision=int(i.get("revision") or 0),
                    state=_STATES.get(str(i.get("state")), common_pb2.ENGINE_STATE_UNSPECIFIED),
                    error_message=str(i.get("error") or ""),
                    registered_at=_timestamp(i.get("startedAt")),
                )
                for i in found
            ]
        )

    @_rpc
    async def GetAgentCard(self, p: Principal, request: Any) -> Any:
        name = _required(request.agent_name, "agent_name")
        card = await self.cp.get_agent_card(p, name)
        return _pb.GetAgentCardResponse(agent_card_json=json.dumps(card))

    @_rpc
    async def IssueInvokeToken(self, p: Principal, request: Any) -> Any:
        name = _required(request.agent_name, "agent_name")
        minted = await self.cp.invoke_token(p, name)
        expires_at = Timestamp()
        expires_at.FromDatetime(minted.expires_at)
        return _pb.IssueInvokeTokenResponse(
            token=minted.token,
            expires_at=expires_at,
            issuer=minted.issuer,
            subject=minted.subject,
            audience=minted.audience,
        )


class _ReleaseService(_Service):
    async def _reply(self, p: Principal, agent: str, spec: ReleaseSpec) -> Any:
        entry = (await self.cp.last_changes(p, "Release")).get(agent)
        return _release(agent, spec, entry)

    @_rpc
    async def SetRelease(self, p: Principal, request: Any) -> Any:
        agent = _required(request.agent_name, "agent_name")
        policy = _json_object(request.policy_json, "policy_json") if request.policy_json else {}
        repeated = [k for k in _RELEASE_FIELDS if k in policy]
        if repeated:
            raise BadRequestError(
                f"policy_json.{repeated[0]}: set it in its own request field, not in policy_json"
            )
        data: dict[str, Any] = {**policy, "canaryWeight": request.canary_weight}
        data["headerMatch"] = [
            {"name": h.name, **({w: getattr(h, w)} if (w := h.WhichOneof("match")) else {})}
            for h in request.header_match
        ]
        if request.HasField("stable_revision"):
            data["stableRevision"] = request.stable_revision
        if request.HasField("canary_revision"):
            data["canaryRevision"] = request.canary_revision
        spec = validate_model(ReleaseSpec, data)
        stored = await self.cp.set_release(p, agent, spec, dry_run=request.dry_run)
        return _pb.SetReleaseResponse(release=await self._reply(p, agent, stored))

    @_rpc
    async def PromoteRelease(self, p: Principal, request: Any) -> Any:
        agent = _required(request.agent_name, "agent_name")
        spec = await self.cp.promote(p, agent)
        return _pb.PromoteReleaseResponse(release=await self._reply(p, agent, spec))

    @_rpc
    async def AbortRelease(self, p: Principal, request: Any) -> Any:
        agent = _required(request.agent_name, "agent_name")
        spec = await self.cp.abort(p, agent)
        return _pb.AbortReleaseResponse(release=await self._reply(p, agent, spec))

    @_rpc
    async def GetRelease(self, p: Principal, request: Any) -> Any:
        agent = _required(request.agent_name, "agent_name")
        spec = await self.cp.get_release(p, agent)
        if spec is None:
            raise NotFoundError(kind="release policy of agent", name=agent)
        return _pb.GetReleaseResponse(release=await self._reply(p, agent, spec))


class _CredentialService(_Service):
    @_rpc
    async def PutCredential(self, p: Principal, request: Any) -> Any:
        info = await self.cp.put_credential(
            p,
            path=_required(request.path, "path"),
            field=_required(request.field, "field"),
            value=_required(request.value, "value"),
            mount=request.mount or None,
        )
        entry = (await self.cp.last_changes(p, "Credential")).get(info.reference)
        return _pb.PutCredentialResponse(credential=_credential(info, entry))

    @_rpc
    async def ListCredentials(self, p: Principal, request: Any) -> Any:
        prefix = request.path_prefix.lstrip("/")
        folder = prefix.rpartition("/")[0]  # list the folder, keep the paths starting with prefix
        found = await self.cp.list_credentials(p, prefix=folder, mount=request.mount or None)
        found = [c for c in found if c.path.startswith(prefix)]
        page, token = _page(found, request.page_size, request.page_token)
        changes = await self.cp.last_changes(p, "Credential")
        return _pb.ListCredentialsResponse(
            credentials=[_credential(c, changes.get(c.reference)) for c in page],
            next_page_token=token,
        )


class _AuditService(_Service):
    @_rpc
    async def ListAuditEntries(self, p: Principal, request: Any) -> Any:
        entries = await self.cp.audit(
            p, name=request.name or None, kind=request.kind or None, limit=sys.maxsize
        )
        if request.HasField("since") or request.HasField("until"):
            since = request.since.ToDatetime(tzinfo=UTC) if request.HasField("since") else None
            until = request.until.ToDatetime(tzinfo=UTC) if request.HasField("until") else None
            entries = [
                e
                for e in entries
                if (since is None or datetime.fromisoformat(e.time) >= since)
                and (until is None or datetime.fromisoformat(e.time) < until)
            ]
        page, token = _page(entries, request.page_size, request.page_token)
        return _pb.ListAuditEntriesResponse(
            entries=[_audit_entry(e) for e in page], next_page_token=token
        )


_SERVICERS: list[tuple[type[_Service], Callable[[Any, grpc.aio.Server], None]]] = [
    (_AgentService, control_plane_pb2_grpc.add_AgentServiceServicer_to_server),
    (_PromptService, control_plane_pb2_grpc.add_PromptServiceServicer_to_server),
    (_McpRegistryService, control_plane_pb2_grpc.add_McpRegistryServiceServicer_to_server),
    (_AgentRegistryService, control_plane_pb2_grpc.add_AgentRegistryServiceServicer_to_server),
    (_ReleaseService, control_plane_pb2_grpc.add_ReleaseServiceServicer_to_server),
    (_CredentialService, control_plane_pb2_grpc.add_CredentialServiceServicer_to_server),
    (_AuditService, control_plane_pb2_grpc.add_AuditServiceServicer_to_server),
]


async def build_grpc_server(
    control_plane: ControlPlane, authenticator: Authenticator, address: str
) -> grpc.aio.Server:
    """A gRPC server bound to ``address`` (``host:port``) with every control-plane service,
    health (SERVING: it answers only once the caller has started the server) and
    reflection. The caller starts and stops it."""
    # no SO_REUSEPORT: a second server on the same port must fail, not share the traffic
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    for servicer, add in _SERVICERS:
        add(servicer(control_plane, authenticator), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (
            *SERVICE_NAMES,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    server.add_insecure_port(address)
    return server
