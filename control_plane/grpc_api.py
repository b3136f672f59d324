"""The wire mapping of the control-plane API: proto request -> ControlPlane -> proto response.

One servicer per service of ``proto/specmesh/v1/control_plane.proto``. Each RPC is an
``impl(self, principal, request)`` that reads the request's fields, calls one
:class:`~control_plane.api.ControlPlane` method (which checks the role, filters and
pages) and converts what it returns into the response message -- nothing else.

Two transports call the same impls:

- gRPC (:func:`build_grpc_server`): the ``authorization`` metadata is authenticated by
  the :class:`~control_plane.auth.Authenticator` (``Bearer <token>``); an error is
  answered with the status of :func:`control_plane.errors.error_mapping`, the text of
  :func:`~control_plane.errors.error_message`, and the trailing metadata
  ``specmesh-error-reason`` carrying the table's reason. An unexpected error is logged
  and answered INTERNAL without its text.
- REST, transcoded from the RPCs' ``google.api.http`` rules: :func:`build_servicers`
  and :meth:`Servicer.invoke` (the caller authenticates and maps errors the same way).

Documents travel as ``google.protobuf.Struct`` (:func:`to_struct`, :func:`from_struct`),
change values as ``google.protobuf.Value``, times as ``Timestamp``. gRPC health answers
SERVING for ``""`` and every service, and reflection lists every service.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.struct_pb2 import Value
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import ValidationError

from control_plane.api import MASK, ControlPlane, CredentialInfo
from control_plane.auth import Authenticator, Principal
from control_plane.errors import BadRequestError, error_mapping, error_message
from control_plane.mcptools import ToolListing
from control_plane.paging import PageRequest
from control_plane.tokens import DEFAULT_TTL_SECONDS, TokenRecord, TokenRequest
from control_plane.traces import GROUP_KEYS, Span, TokenUsageRow, TraceSummary
from specmesh.errors import NotFoundError, SpecError
from specmesh.protojson import from_struct, to_struct
from specmesh.spec.diff import Change
from specmesh.spec.manifest import parse_manifest
from specmesh.spec.models import McpServerSpec, PromptEntry, PromptRelease, ReleaseSpec
from specmesh.spec.validation import issues_from_validation_error, validate_model
from specmesh.spec_apply import ApplyOutcome
from specmesh.store import AgentRecord, AuditEntry, ReleaseState
from specmesh.v1 import common_pb2, control_plane_pb2, control_plane_pb2_grpc
from specmesh.workloads import AgentStatus

__all__ = [
    "REASON_METADATA",
    "SERVICE_NAMES",
    "Servicer",
    "build_grpc_server",
    "build_servicers",
    "from_struct",
    "to_struct",
]

logger = logging.getLogger(__name__)

SERVICE_NAMES: tuple[str, ...] = tuple(
    s.full_name for s in control_plane_pb2.DESCRIPTOR.services_by_name.values()
)
"""Full names of the control plane's services (``specmesh.v1.AgentService``...)."""

REASON_METADATA = "specmesh-error-reason"
"""Trailing metadata key of a failed RPC: the error table's reason."""

_pb = control_plane_pb2

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
_DEFAULT_TRACE_LIMIT = 200
_MAX_TRACE_LIMIT = 1000
_DEFAULT_GRACE_SECONDS = 3600


# ---------------------------------------------------------------- conversions


def _value(data: Any) -> Value:
    return json_format.ParseDict(data, Value())


def _timestamp(moment: str | datetime | None) -> Timestamp | None:
    if not moment:
        return None
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment.replace("Z", "+00:00"))
    ts = Timestamp()
    ts.FromDatetime(moment if moment.tzinfo else moment.replace(tzinfo=UTC))
    return ts


def _nanos(ns: int) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def _since(request: Message, field: str = "since") -> datetime | None:
    if not request.HasField(field):
        return None
    moment: datetime = getattr(request, field).ToDatetime(tzinfo=UTC)
    return moment


def _change(change: Change | Mapping[str, Any]) -> common_pb2.Change:
    c = change.to_json() if isinstance(change, Change) else change
    message = common_pb2.Change(
        path=c["path"], op=_OPS.get(c["op"], common_pb2.CHANGE_OP_UNSPECIFIED)
    )
    if c["op"] != "add":
        message.old_value.CopyFrom(_value(c.get("old")))
    if c["op"] != "remove":
        message.new_value.CopyFrom(_value(c.get("new")))
    return message


def _revision_info(record: AgentRecord) -> common_pb2.RevisionInfo:
    return common_pb2.RevisionInfo(
        revision=record.revision,
        author=record.author,
        created_at=_timestamp(record.created_at),
        message=record.message,
        resolved=to_struct(record.resolved) if record.resolved is not None else None,
    )


def _agent(record: AgentRecord, status: AgentStatus | None = None) -> _pb.Agent:
    agent = _pb.Agent(
        name=record.name, revision_info=_revision_info(record), spec=to_struct(record.spec)
    )
    if status is not None:
        agent.status.CopyFrom(_pb.AgentStatusSummary(phase=status.phase, **_counts(status)))
    return agent


def _counts(status: AgentStatus) -> dict[str, int]:
    return {
        "ready_replicas": sum(t.ready for t in status.tracks.values()),
        "desired_replicas": sum(t.desired for t in status.tracks.values()),
    }


def _agent_status(data: Mapping[str, Any]) -> _pb.AgentStatus:
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


def _mcp_server(name: str, spec: McpServerSpec, entry: AuditEntry | None) -> _pb.McpServer:
    return _pb.McpServer(name=name, spec=to_struct(spec.model_dump(mode="json")), **_who(entry))


def _mcp_tool(tool: Mapping[str, Any]) -> _pb.McpTool:
    return _pb.McpTool(
        name=str(tool["name"]),
        description=str(tool.get("description") or ""),
        input_schema=to_struct(tool.get("inputSchema") or {}),
    )


def _tool_listing(name: str, listing: ToolListing) -> _pb.McpToolListing:
    return _pb.McpToolListing(
        mcp_server_name=name,
        tools=[_mcp_tool(t) for t in listing.tools],
        refreshed_at=_timestamp(listing.refreshed_at),
        checked_at=_timestamp(listing.checked_at),
        error=listing.error or "",
        credentials_from=listing.credentials_from or "",
    )


def _release(
    agent: str,
    state: ReleaseState,
    entry: AuditEntry | None,
    analysis: dict[str, Any] | None = None,
) -> _pb.Release:
    spec = state.spec
    if spec is None:  # the callers answer "no policy" themselves; this is a bug
        raise NotFoundError(kind="release of agent", name=agent)
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
        spec=to_struct(spec.model_dump(mode="json", by_alias=True)),
        version=state.version,
        analysis=to_struct(analysis) if analysis is not None else None,
        **_who(entry),
    )


def _credential(info: CredentialInfo, entry: AuditEntry | None) -> _pb.Credential:
    return _pb.Credential(
        reference=info.reference,
        mount=info.mount,
        path=info.path,
        field=info.field,
        masked_value=MASK,
        version=info.version,
        **_who(entry),
    )


def _audit_entry(e: AuditEntry) -> _pb.AuditEntry:
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
        before=None if e.before is None else to_struct(e.before),
        after=None if e.after is None else to_struct(e.after),
        details=None if e.details is None else to_struct(e.details),
    )


def _trace_summary(t: TraceSummary) -> _pb.TraceSummary:
    return _pb.TraceSummary(
        trace_id=t.trace_id,
        root_name=t.root_name,
        agents=list(t.agents),
        start_time=_nanos(t.start_ns),
        start_time_unix_nano=t.start_ns,
        duration_ms=t.duration_ns / 1e6,
        span_count=t.span_count,
        error=t.error,
        input_tokens=t.input_tokens,
        output_tokens=t.output_tokens,
        total_tokens=t.total_tokens,
        cost_usd=t.cost_usd,
        unpriced_models=list(t.unpriced_models),
    )


def _span(s: Span) -> _pb.Span:
    return _pb.Span(
        trace_id=s.trace_id,
        span_id=s.span_id,
        parent_span_id=s.parent_span_id or "",
        name=s.name,
        kind=s.kind,
        start_time=_nanos(s.start_ns),
        start_time_unix_nano=s.start_ns,
        end_time_unix_nano=s.end_ns,
        duration_ms=s.duration_ns / 1e6,
        status=s.status,
        status_message=s.status_message,
        service_name=s.service_name,
        agent=s.agent,
        attributes=to_struct(s.attributes),
        events=[
            _pb.SpanEvent(
                name=e.name,
                time=_nanos(e.time_ns),
                time_unix_nano=e.time_ns,
                attributes=to_struct(e.attributes),
            )
            for e in s.events
        ],
        resource=to_struct(s.resource),
    )


def _usage_row(row: TokenUsageRow) -> _pb.TokenUsageRow:
    return _pb.TokenUsageRow(
        agent=row.group.get("agent", ""),
        model=row.group.get("model", ""),
        day=row.group.get("day", ""),
        calls=row.calls,
        input_tokens=row.input_tokens,
        output_tokens=row.output_tokens,
        total_tokens=row.input_tokens + row.output_tokens,
        cost_usd=row.cost_usd,
        unpriced_calls=row.unpriced_calls,
    )


def _api_token(record: TokenRecord, now: datetime) -> _pb.ApiToken:
    return _pb.ApiToken(
        id=record.id,
        name=record.name,
        roles=[str(r) for r in record.roles],
        source=record.source,
        created_at=_timestamp(record.created_at),
        created_by=record.created_by or "",
        expires_at=_timestamp(record.expires_at),
        revoked_at=_timestamp(record.revoked_at),
        revoked_by=record.revoked_by or "",
        state=record.state(now),
    )


def _changes(outcome: ApplyOutcome) -> list[common_pb2.Change]:
    return [_change(c) for c in (outcome.result.changes if outcome.result is not None else [])]


# ---------------------------------------------------------------- request helpers


def _manifest(request: Message, kind: str | None) -> dict[str, Any]:
    """The request's ``manifest``; of ``kind`` when given (validated by the apply)."""
    if not request.HasField("manifest"):
        raise BadRequestError("manifest: required")
    # its depth is bounded by protobuf's recursion limit (100 messages: ~33 JSON levels)
    doc = from_struct(request.manifest)  # type: ignore[attr-defined]
    if kind is not None and doc.get("kind") != kind:
        raise BadRequestError(f"manifest: kind must be {kind!r} (got {doc.get('kind')!r})")
    return doc


def _required(value: str, field: str) -> str:
    if not value:
        raise BadRequestError(f"{field}: required")
    return value


def _revision(value: int, field: str) -> int:
    if value < 0:
        raise BadRequestError(f"{field}: must be >= 0 (got {value})")
    return value


def _optional(request: Message, field: str) -> int | None:
    if not request.HasField(field):
        return None
    return _revision(getattr(request, field), field)


def _page(request: Message) -> PageRequest:
    return PageRequest(request.page_size, request.page_token)  # type: ignore[attr-defined]


def _release_spec(request: Message) -> ReleaseSpec:
    """The request's ``release`` (a ReleaseSpec document), validated."""
    data = from_struct(request.release) if request.HasField("release") else {}  # type: ignore[attr-defined]
    return validate_model(ReleaseSpec, data, source="release")


# ---------------------------------------------------------------- services

_Impl = Callable[[Any, Principal, Any], Awaitable[Message]]
_Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Message]]


def _rpc(impl: _Impl) -> _Handler:
    """Make ``impl(self, principal, request)`` a gRPC handler (authentication, errors);
    :meth:`Servicer.invoke` calls ``impl`` directly."""

    async def handler(self: Servicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._run(impl, request, context)

    handler.__name__ = impl.__name__
    handler.__doc__ = impl.__doc__
    handler.impl = impl  # type: ignore[attr-defined]
    return handler


class Servicer:
    """The base of every service's servicer."""

    def __init__(self, control_plane: ControlPlane, authenticator: Authenticator) -> None:
        self.cp = control_plane
        self._authenticator = authenticator

    async def invoke(self, method: str, principal: Principal, request: Message) -> Message:
        """Run RPC ``method`` of this service for an authenticated ``principal``; raises the
        API's errors (see :data:`control_plane.errors.ERROR_TABLE`)."""
        impl = getattr(getattr(type(self), method, None), "impl", None)
        if impl is None:
            raise NotFoundError(kind=f"RPC of {type(self).__name__}", name=method)
        response: Message = await impl(self, principal, request)
        return response

    async def _run(self, impl: _Impl, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            authorization = next(
                (v for k, v in context.invocation_metadata() or () if k == "authorization"), None
            )
            principal = self._authenticator.authenticate(authorization)
            return await impl(self, principal, request)
        except Exception as e:
            mapping = error_mapping(e)
            if mapping.reason == "internal":
                logger.exception("gRPC %s.%s failed", type(self).__name__, impl.__name__)
            details = error_message(e)
        await context.abort(mapping.grpc_status, details, ((REASON_METADATA, mapping.reason),))


class _IdentityService(Servicer):
    @_rpc
    async def WhoAmI(self, p: Principal, request: Any) -> Any:
        me = await self.cp.whoami(p)
        return _pb.WhoAmIResponse(name=me.name, roles=me.roles, can=me.can)


class _ManifestService(Servicer):
    @_rpc
    async def ApplyManifest(self, p: Principal, request: Any) -> Any:
        outcome = await self.cp.apply(
            p,
            _manifest(request, None),
            expected_revision=_optional(request, "expected_revision"),
            dry_run=request.dry_run,
            source="manifest",
            message=request.message,
        )
        return _pb.ApplyManifestResponse(
            kind=outcome.kind,
            name=outcome.name,
            changed=outcome.changed,
            revision=outcome.revision or 0,
            changes=_changes(outcome),
            warnings=[str(w) for w in outcome.warnings],
            secrets_moved=outcome.secrets_moved,
        )


class _AgentService(Servicer):
    @_rpc
    async def ApplyAgent(self, p: Principal, request: Any) -> Any:
        outcome = await self.cp.apply(
            p,
            _manifest(request, "Agent"),
            expected_revision=_optional(request, "expected_revision"),
            dry_run=request.dry_run,
            source="manifest",
            message=request.message,
        )
        if request.dry_run:  # nothing written: the spec with its secrets moved does not exist
            agent = _pb.Agent(name=outcome.name)
        else:
            agent = _agent(await self.cp.get_agent(p, outcome.name, outcome.revision))
        return _pb.ApplyAgentResponse(
            agent=agent,
            changes=_changes(outcome),
            created_revision=outcome.changed,
            warnings=[str(w) for w in outcome.warnings],
            secrets_moved=outcome.secrets_moved,
        )

    @_rpc
    async def GetAgent(self, p: Principal, request: Any) -> Any:
        name = _required(request.agent_name, "agent_name")
        record = await self.cp.get_agent(p, name, _revision(request.revision, "revision") or None)
        return _pb.GetAgentResponse(agent=_agent(record))

    @_rpc
    async def ListAgents(self, p: Principal, request: Any) -> Any:
        page = await self.cp.agents_page(p, _page(request))
        return _pb.ListAgentsResponse(
            agents=[_agent(a.record, a.status) for a in page.items],
            next_page_token=page.next_page_token,
        )

    @_rpc
    async def DeleteAgent(self, p: Principal, request: Any) -> Any:
        name = _required(request.agent_name, "agent_name")
        await self.cp.delete_agent(
            p, name, expected_revision=_optional(request, "expected_revision")
        )
        return _pb.DeleteAgentResponse(agent_name=name)

    @_rpc
    async def ListAgentRevisions(self, p: Principal, request: Any) -> Any:
        name = _required(request.agent_name, "agent_name")
        page = await self.cp.revisions_page(p, name, _page(request))
        return _pb.ListAgentRevisionsResponse(
            revisions=[_revision_info(r) for r in page.items],
            next_page_token=page.next_page_token,
        )

    @_rpc
    async def DiffAgentRevisions(self, p: Principal, request: Any) -> Any:
        name = _required(request.agent_name, "agent_name")
        if request.from_revision <= 0:
            raise BadRequestError("from_revision: required (a revision >= 1)")
        to = _revision(request.to_revision, "to_revision") or None
        changes = await self.cp.diff(p, name, request.from_revision, to)
        return _pb.DiffAgentRevisionsResponse(changes=[_change(c) for c in changes])

    @_rpc
    async def RollbackAgent(self, p: Principal, request: Any) -> Any:
        name = _required(request.agent_name, "agent_name")
        if request.revision <= 0:
            raise BadRequestError("revision: required (a revision >= 1)")
        result = await self.cp.rollback(
            p,
            name,
            request.revision,
            expected_revision=_optional(request, "expected_revision"),
            message=request.message,
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
        return _pb.ScaleAgentResponse(
            agent=_agent(record),
            changes=_changes(outcome),
            created_revision=outcome.changed,
            warnings=[str(w) for w in outcome.warnings],
        )


_PromptChanges = tuple[dict[str, AuditEntry], dict[str, AuditEntry]]


class _PromptService(Servicer):
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
        released = max(
            (e for e in (releases.get(key), publishes.get(key)) if e),  # a set, a rollback
            key=lambda e: e.time,
            default=None,
        )
        ordered = sorted(versions, key=lambda v: (published[v].time if v in published else "", v))
        entries = [*published.values(), *([released] if released else [])]
        newest = max(entries, key=lambda e: e.time, default=None)
        message = _pb.Prompt(prompt_key=key, versions=ordered, **_who(newest))
        if release is not None:
            message.release.labels.update(release.labels)
            message.release.weights.update(release.weights)
            if release.current:  # unset (presence) when the highest version serves
                message.release.current = release.current
        return message, published

    async def _stored(self, p: Principal, key: str) -> Any:
        """The Prompt message of ``key`` as stored now."""
        entries, release = await self.cp.get_prompt(p, key)
        return (await self._prompt(p, key, [e.version for e in entries], release))[0]

    @staticmethod
    def _version(entry: PromptEntry, published: Mapping[str, AuditEntry]) -> Any:
        e = published.get(entry.version)
        return _pb.PromptVersion(
            prompt_key=entry.prompt_key,
            version=entry.version,
            entry=to_struct(entry.model_dump(mode="json", by_alias=True)),
            author=e.actor if e else "",
            created_at=_timestamp(e.time) if e else None,
        )

    @_rpc
    async def PublishPromptVersion(self, p: Principal, request: Any) -> Any:
        doc = _manifest(request, "Prompt")
        outcome = await self.cp.apply(
            p, doc, dry_run=request.dry_run, source="manifest", message=request.message
        )
        key, _, version = outcome.name.rpartition("@")
        if request.dry_run:
            spec = parse_manifest(doc, source="manifest").spec
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
        page = await self.cp.prompts_page(p, _page(request))
        changes = await self._changes(p)  # one audit read for the whole page
        out = []
        for key, versions in page.items:
            _, release = await self.cp.get_prompt(p, key)
            out.append((await self._prompt(p, key, versions, release, changes))[0])
        return _pb.ListPromptsResponse(prompts=out, next_page_token=page.next_page_token)

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
            {
                "labels": dict(request.release.labels),
                "weights": dict(request.release.weights),
                "current": request.release.current or None,
            },
            source="release",
        )
        await self.cp.set_prompt_release(p, key, release, message=request.message)
        return _pb.SetPromptReleaseResponse(prompt=await self._stored(p, key))

    @_rpc
    async def RollbackPrompt(self, p: Principal, request: Any) -> Any:
        key = _required(request.prompt_key, "prompt_key")
        version = _required(request.version, "version")
        await self.cp.rollback_prompt(p, key, version, message=request.message)
        return _pb.RollbackPromptResponse(prompt=await self._stored(p, key))

    @_rpc
    async def GetPromptHistory(self, p: Principal, request: Any) -> Any:
        key = _required(request.prompt_key, "prompt_key")
        history = await self.cp.prompt_history(p, key)
        return _pb.GetPromptHistoryResponse(
            versions=[self._version(e, history.published) for e in history.versions],
            release_changes=[_audit_entry(e) for e in history.release_changes],
        )

    @_rpc
    async def GetPromptStats(self, p: Principal, request: Any) -> Any:
        key = _required(request.prompt_key, "prompt_key")
        if not 0 <= request.trace_limit <= _MAX_TRACE_LIMIT:
            raise BadRequestError(
                f"trace_limit: must be 0 to {_MAX_TRACE_LIMIT} (got {request.trace_limit})"
            )
        rows = await self.cp.prompt_stats(
            p, key, since=_since(request), limit=request.trace_limit or _DEFAULT_TRACE_LIMIT
        )
        return _pb.GetPromptStatsResponse(
            versions=[
                _pb.PromptVersionStats(
                    version=r["version"],
                    requests=r["requests"],
                    errors=r["errors"],
                    input_tokens=r["inputTokens"],
                    output_tokens=r["outputTokens"],
                    latency_p50_ms=r["latencyP50Ms"],
                    latency_p95_ms=r["latencyP95Ms"],
                    agents=r["agents"],
                )
                for r in rows
            ]
        )


class _McpRegistryService(Servicer):
    @_rpc
    async def RegisterMcpServer(self, p: Principal, request: Any) -> Any:
        doc = _manifest(request, "McpServer")
        outcome = await self.cp.apply(
            p, doc, dry_run=request.dry_run, source="manifest", message=request.message
        )
        if request.dry_run:
            spec = parse_manifest(doc, source="manifest").spec
            return _pb.RegisterMcpServerResponse(mcp_server=_mcp_server(outcome.name, spec, None))
        spec = await self.cp.get_mcp_server(p, outcome.name)
        entry = (await self.cp.last_changes(p, "McpServer")).get(outcome.name)
        return _pb.RegisterMcpServerResponse(mcp_server=_mcp_server(outcome.name, spec, entry))

    @_rpc
    async def ListMcpServers(self, p: Principal, request: Any) -> Any:
        page = await self.cp.mcp_servers_page(p, _page(request))
        changes = await self.cp.last_changes(p, "McpServer")
        return _pb.ListMcpServersResponse(
            mcp_servers=[_mcp_server(n, s, changes.get(n)) for n, s in page.items],
            next_page_token=page.next_page_token,
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
        page = await self.cp.mcp_tools_page(p, name, _page(request))
        return _pb.ListMcpServerToolsResponse(
            tools=[_mcp_tool(t) for t in page.items], next_page_token=page.next_page_token
        )

    @_rpc
    async def ListMcpToolListings(self, p: Principal, request: Any) -> Any:
        page = await self.cp.mcp_tool_listings_page(p, _page(request))
        return _pb.ListMcpToolListingsResponse(
            listings=[_tool_listing(n, listing) for n, listing in page.items],
            next_page_token=page.next_page_token,
        )


class _AgentRegistryService(Servicer):
    @_rpc
    async def ListInstances(self, p: Principal, request: Any) -> Any:
        page = await self.cp.instances_page(p, request.agent_name or None, _page(request))
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
                for i in page.items
            ],
            next_page_token=page.next_page_token,
        )

    @_rpc
    async def GetAgentCard(self, p: Principal, request: Any) -> Any:
        name = _required(request.agent_name, "agent_name")
        card = await self.cp.get_agent_card(p, name)
        return _pb.GetAgentCardResponse(agent_card=to_struct(card))

    @_rpc
    async def IssueInvokeToken(self, p: Principal, request: Any) -> Any:
        name = _required(request.agent_name, "agent_name")
        minted = await self.cp.invoke_token(p, name)
        return _pb.IssueInvokeTokenResponse(
            token=minted.token,
            expires_at=_timestamp(minted.expires_at),
            issuer=minted.issuer,
            subject=minted.subject,
            audience=minted.audience,
        )


class _ReleaseService(Servicer):
    async def _reply(self, p: Principal, agent: str, state: ReleaseState) -> Any:
        entry = (await self.cp.last_changes(p, "Release")).get(agent)
        return _release(agent, state, entry, await self.cp.release_analysis(p, agent))

    @_rpc
    async def SetRelease(self, p: Principal, request: Any) -> Any:
        agent = _required(request.agent_name, "agent_name")
        stored = await self.cp.set_release(
            p,
            agent,
            _release_spec(request),
            dry_run=request.dry_run,
            message=request.message,
            allow_empty=request.allow_empty,
            expected_version=_optional(request, "expected_version"),
        )
        return _pb.SetReleaseResponse(release=await self._reply(p, agent, stored))

    @_rpc
    async def PromoteRelease(self, p: Principal, request: Any) -> Any:
        agent = _required(request.agent_name, "agent_name")
        state = await self.cp.promote(
            p,
            agent,
            message=request.message,
            expected_version=_optional(request, "expected_version"),
        )
        return _pb.PromoteReleaseResponse(release=await self._reply(p, agent, state))

    @_rpc
    async def AbortRelease(self, p: Principal, request: Any) -> Any:
        agent = _required(request.agent_name, "agent_name")
        state = await self.cp.abort(
            p,
            agent,
            message=request.message,
            expected_version=_optional(request, "expected_version"),
        )
        return _pb.AbortReleaseResponse(release=await self._reply(p, agent, state))

    @_rpc
    async def GetRelease(self, p: Principal, request: Any) -> Any:
        agent = _required(request.agent_name, "agent_name")
        state = await self.cp.get_release(p, agent)
        if state.spec is None:
            return _pb.GetReleaseResponse()
        return _pb.GetReleaseResponse(release=await self._reply(p, agent, state))

    @_rpc
    async def PreviewRelease(self, p: Principal, request: Any) -> Any:
        agent = _required(request.agent_name, "agent_name")
        preview = await self.cp.preview_release(p, agent, _release_spec(request))
        return _pb.PreviewReleaseResponse(
            current=[to_struct(o) for o in preview["current"]],
            proposed=[to_struct(o) for o in preview["proposed"]],
        )


class _CredentialService(Servicer):
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
        page = await self.cp.credentials_page(
            p, path_prefix=request.path_prefix, mount=request.mount or None, page=_page(request)
        )
        changes = await self.cp.last_changes(p, "Credential")
        return _pb.ListCredentialsResponse(
            credentials=[_credential(c, changes.get(c.reference)) for c in page.items],
            next_page_token=page.next_page_token,
        )

    @_rpc
    async def CollectSecretGarbage(self, p: Principal, request: Any) -> Any:
        grace = request.grace_seconds or _DEFAULT_GRACE_SECONDS
        report = await self.cp.collect_garbage(p, grace_seconds=grace)
        return _pb.CollectSecretGarbageResponse(destroyed=report["destroyed"], kept=report["kept"])


class _GrantService(Servicer):
    @_rpc
    async def ListGrants(self, p: Principal, request: Any) -> Any:
        page = await self.cp.grants_page(p, request.agent_name or None, _page(request))
        return _pb.ListGrantsResponse(
            grants=[
                _pb.Grant(
                    agent_name=str(g["agent"]),
                    secret=str(g["secret"]),
                    mount=str(g["mount"]),
                    path=str(g["path"]),
                    granted_by=str(g.get("grantedBy") or ""),
                    granted_at=_timestamp(g.get("grantedAt")),
                )
                for g in page.items
            ],
            next_page_token=page.next_page_token,
        )

    @_rpc
    async def ShareSecret(self, p: Principal, request: Any) -> Any:
        agent = _required(request.agent_name, "agent_name")
        shared = await self.cp.share_secret(p, agent, _required(request.secret, "secret"))
        return _pb.ShareSecretResponse(agent_name=agent, secret=shared["secret"])

    @_rpc
    async def UnshareSecret(self, p: Principal, request: Any) -> Any:
        agent = _required(request.agent_name, "agent_name")
        secret = await self.cp.unshare_secret(p, agent, _required(request.secret, "secret"))
        return _pb.UnshareSecretResponse(agent_name=agent, secret=secret)


class _AuditService(Servicer):
    @_rpc
    async def ListAuditEntries(self, p: Principal, request: Any) -> Any:
        page = await self.cp.audit_page(
            p,
            name=request.name or None,
            kind=request.kind or None,
            since=_since(request),
            until=_since(request, "until"),
            page=_page(request),
        )
        return _pb.ListAuditEntriesResponse(
            entries=[_audit_entry(e) for e in page.items], next_page_token=page.next_page_token
        )


class _MeshService(Servicer):
    @_rpc
    async def RenderMesh(self, p: Principal, request: Any) -> Any:
        return _pb.RenderMeshResponse(objects=[to_struct(o) for o in await self.cp.render_mesh(p)])


class _TraceService(Servicer):
    @_rpc
    async def ListTraces(self, p: Principal, request: Any) -> Any:
        page = await self.cp.traces_page(
            p,
            agent=request.agent_name or None,
            context_id=request.context_id or None,
            since=_since(request),
            page=_page(request),
        )
        return _pb.ListTracesResponse(
            traces=[_trace_summary(t) for t in page.items], next_page_token=page.next_page_token
        )

    @_rpc
    async def GetTrace(self, p: Principal, request: Any) -> Any:
        trace_id = _required(request.trace_id, "trace_id")
        return _pb.GetTraceResponse(spans=[_span(s) for s in await self.cp.get_trace(p, trace_id)])

    @_rpc
    async def GetTokenUsage(self, p: Principal, request: Any) -> Any:
        rows = await self.cp.token_usage(
            p, group_by=tuple(request.group_by) or GROUP_KEYS, since=_since(request)
        )
        return _pb.GetTokenUsageResponse(rows=[_usage_row(r) for r in rows])


class _TokenService(Servicer):
    @_rpc
    async def CreateToken(self, p: Principal, request: Any) -> Any:
        data = {
            "name": request.name,
            "roles": list(request.roles),
            "ttlSeconds": request.ttl_seconds or DEFAULT_TTL_SECONDS,
        }
        try:
            token_request = TokenRequest.model_validate(data)
        except ValidationError as e:
            raise SpecError(issues_from_validation_error(e, TokenRequest)) from None
        secret, record = await self.cp.create_token(p, token_request)
        return _pb.CreateTokenResponse(
            token=secret, api_token=_api_token(record, self.cp.tokens.now())
        )

    @_rpc
    async def ListTokens(self, p: Principal, request: Any) -> Any:
        page = await self.cp.tokens_page(p, _page(request))
        now = self.cp.tokens.now()
        return _pb.ListTokensResponse(
            api_tokens=[_api_token(t, now) for t in page.items],
            next_page_token=page.next_page_token,
        )

    @_rpc
    async def RevokeToken(self, p: Principal, request: Any) -> Any:
        token_id = _required(request.token_id, "token_id")
        record = await self.cp.revoke_token(p, token_id)
        return _pb.RevokeTokenResponse(api_token=_api_token(record, self.cp.tokens.now()))


_SERVICERS: tuple[type[Servicer], ...] = (
    _IdentityService,
    _ManifestService,
    _AgentService,
    _PromptService,
    _McpRegistryService,
    _AgentRegistryService,
    _ReleaseService,
    _CredentialService,
    _GrantService,
    _AuditService,
    _MeshService,
    _TraceService,
    _TokenService,
)
"""One servicer class per service; ``_<Name>`` serves ``specmesh.v1.<Name>``."""


def _service_name(cls: type[Servicer]) -> str:
    return cls.__name__.lstrip("_")


def build_servicers(
    control_plane: ControlPlane, authenticator: Authenticator
) -> dict[str, Servicer]:
    """One servicer per service, by full name (``specmesh.v1.AgentService``...)."""
    return {
        f"specmesh.v1.{_service_name(cls)}": cls(control_plane, authenticator) for cls in _SERVICERS
    }


async def build_grpc_server(
    control_plane: ControlPlane, authenticator: Authenticator, address: str
) -> grpc.aio.Server:
    """A gRPC server bound to ``address`` (``host:port``) with every control-plane service,
    health (SERVING: it answers only once the caller has started the server) and
    reflection. The caller starts and stops it."""
    # no SO_REUSEPORT: a second server on the same port must fail, not share the traffic
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    for servicer in build_servicers(control_plane, authenticator).values():
        add = f"add_{_service_name(type(servicer))}Servicer_to_server"
        getattr(control_plane_pb2_grpc, add)(servicer, server)
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
