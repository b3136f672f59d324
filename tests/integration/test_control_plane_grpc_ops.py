"""The RPCs that made the proto the one contract, through real gRPC with real etcd and
OpenBao: identity, apply of any kind, change messages, release preview, mesh, grants,
secret garbage collection, traces and token usage, prompt stats, API tokens, paging and
the audit's time filter -- and :meth:`Servicer.invoke`, the transcoder's way in."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from control_plane.api import ControlPlane
from control_plane.auth import PERMISSIONS, Principal, Role, StaticTokenAuthenticator, hash_token
from control_plane.errors import PermissionDeniedError
from control_plane.grpc_api import (
    REASON_METADATA,
    build_grpc_server,
    build_servicers,
    from_struct,
    to_struct,
)
from control_plane.tokens import TokenAuthenticator, TokenStore
from control_plane.traces import InMemoryTraceStore, Span
from specmesh.ports import free_port
from specmesh.store import SpecStore, dumps
from specmesh.v1 import control_plane_pb2 as pb
from specmesh.vault import VaultClient

from ..conftest import publish_prompt
from .release_support import observe_tracks
from .test_control_plane_grpc import TOKENS
from .test_control_plane_grpc import Api as StubsApi

pytestmark = pytest.mark.integration

TRACE = "5b8efff798038103d269b633813fc60c"
START_NS = 1_773_489_600_000_000_000  # 2026-03-14T12:00:00Z


def _agent(name: str = "helper", model: str = "m") -> dict[str, Any]:
    return {
        "apiVersion": "specmesh.io/v1",
        "kind": "Agent",
        "metadata": {"name": name},
        "spec": {"base": {"description": "d", "promptKey": "p"}, "model": {"model": model}},
    }


class Api(StubsApi):
    """Every service's stubs, and the control plane behind them (with its trace store)."""

    def __init__(
        self, channel: grpc.aio.Channel, cp: ControlPlane, traces: InMemoryTraceStore
    ) -> None:
        super().__init__(channel)
        self.cp = cp
        self.traces = traces


@pytest.fixture
async def api(store: SpecStore, vault: VaultClient) -> AsyncIterator[Api]:
    await publish_prompt(store)
    static = StaticTokenAuthenticator(
        {hash_token(t): Principal(f"user-{r}", frozenset({Role(r)})) for r, t in TOKENS.items()}
    )
    async with TokenAuthenticator(etcd=store.etcd, keys=store.keys, static=static) as auth:
        assert await auth.wait_loaded(timeout=10)
        traces = InMemoryTraceStore()
        tokens = TokenStore(store=store, static=static, on_change=auth.observe)
        cp = ControlPlane(store=store, vault=vault, traces=traces, tokens=tokens)
        address = f"127.0.0.1:{free_port()}"
        server = await build_grpc_server(cp, auth, address)
        await server.start()
        async with grpc.aio.insecure_channel(address) as channel:
            yield Api(channel, cp, traces)
        await server.stop(None)


async def _error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def _ts(moment: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(moment)
    return ts


# ---------------------------------------------------------------- identity, apply, messages


async def test_whoami_names_the_caller_its_roles_and_what_they_allow(api: Api) -> None:
    me = await api.identity.WhoAmI(pb.WhoAmIRequest(), metadata=api.as_("secrets-admin"))

    assert (me.name, list(me.roles)) == ("user-secrets-admin", ["secrets-admin"])
    assert "credentials.write" in me.can and "agents.write" not in me.can
    assert set(me.can) <= set(PERMISSIONS) and list(me.can) == sorted(me.can)


async def test_apply_manifest_takes_any_kind_and_refuses_a_viewer(api: Api) -> None:
    agent = await api.manifests.ApplyManifest(
        pb.ApplyManifestRequest(manifest=to_struct(_agent()), message="first"),
        metadata=api.as_("operator"),
    )
    dry = await api.manifests.ApplyManifest(
        pb.ApplyManifestRequest(manifest=to_struct(_agent(model="m2")), dry_run=True),
        metadata=api.as_("operator"),
    )
    prompt = await api.manifests.ApplyManifest(
        pb.ApplyManifestRequest(
            manifest=to_struct(
                {
                    "apiVersion": "specmesh.io/v1",
                    "kind": "Prompt",
                    "metadata": {"name": "greeting"},
                    "spec": {"version": "1.0.0", "template": "Hi"},
                }
            )
        ),
        metadata=api.as_("operator"),
    )
    denied = await _error(
        api.manifests.ApplyManifest(
            pb.ApplyManifestRequest(manifest=to_struct(_agent("other"))),
            metadata=api.as_("viewer"),
        )
    )

    assert (agent.kind, agent.name, agent.changed, agent.revision) == ("Agent", "helper", True, 1)
    assert {c.path for c in agent.changes} >= {"model"}
    assert (dry.changed, dry.revision) == (False, 0)
    assert (prompt.kind, prompt.name, prompt.changed) == ("Prompt", "greeting@1.0.0", True)
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (REASON_METADATA, "permission_denied") in tuple(denied.trailing_metadata() or ())
    got = await api.agents.GetAgent(
        pb.GetAgentRequest(agent_name="helper"), metadata=api.as_("viewer")
    )
    assert got.agent.revision_info.message == "first"
    assert from_struct(got.agent.spec)["model"]["model"] == "m"


async def test_every_change_message_reaches_the_audit_entry(api: Api, store: SpecStore) -> None:
    op, admin = api.as_("operator"), api.as_("admin")
    await api.agents.ApplyAgent(
        pb.ApplyAgentRequest(manifest=to_struct(_agent()), message="apply"), metadata=op
    )
    await api.agents.ApplyAgent(
        pb.ApplyAgentRequest(manifest=to_struct(_agent(model="m2")), message="apply 2"),
        metadata=op,
    )
    release = to_struct({"canaryRevision": 2, "canaryWeight": 10})
    await observe_tracks(store, "helper", canary=1)
    await api.releases.SetRelease(
        pb.SetReleaseRequest(agent_name="helper", release=release, message="set"), metadata=op
    )
    await api.releases.PromoteRelease(
        pb.PromoteReleaseRequest(agent_name="helper", message="promote"), metadata=op
    )
    prompt = {
        "apiVersion": "specmesh.io/v1",
        "kind": "Prompt",
        "metadata": {"name": "greeting"},
        "spec": {"version": "1.0.0", "template": "Hi"},
    }
    await api.prompts.PublishPromptVersion(
        pb.PublishPromptVersionRequest(manifest=to_struct(prompt), message="publish"), metadata=op
    )
    await api.prompts.SetPromptRelease(
        pb.SetPromptReleaseRequest(
            prompt_key="greeting",
            release=pb.PromptRelease(labels={"prod": "1.0.0"}),
            message="label",
        ),
        metadata=op,
    )
    mcp = {
        "apiVersion": "specmesh.io/v1",
        "kind": "McpServer",
        "metadata": {"name": "time"},
        "spec": {"url": "http://127.0.0.1:9/mcp"},
    }
    await api.mcp.RegisterMcpServer(
        pb.RegisterMcpServerRequest(manifest=to_struct(mcp), message="register"), metadata=admin
    )

    entries = (
        await api.audit.ListAuditEntries(pb.ListAuditEntriesRequest(), metadata=admin)
    ).entries

    messages = {(e.kind, e.action, e.message) for e in entries}
    assert {
        ("Agent", "apply", "apply"),
        ("Agent", "apply", "apply 2"),
        ("Release", "release.set", "set"),
        ("Release", "release.promote", "promote"),
        ("Prompt", "publish", "publish"),
        ("PromptRelease", "apply", "label"),
        ("McpServer", "apply", "register"),
    } <= messages


# ---------------------------------------------------------------- releases, mesh


async def test_preview_release_renders_now_and_proposed_without_writing(api: Api) -> None:
    op = api.as_("operator")
    for model in ("m1", "m2"):
        await api.agents.ApplyAgent(
            pb.ApplyAgentRequest(manifest=to_struct(_agent(model=model))), metadata=op
        )
    proposal = to_struct({"stableRevision": 1, "canaryRevision": 2, "canaryWeight": 25})

    preview = await api.releases.PreviewRelease(
        pb.PreviewReleaseRequest(agent_name="helper", release=proposal), metadata=op
    )
    unknown_revision = await _error(
        api.releases.PreviewRelease(
            pb.PreviewReleaseRequest(agent_name="helper", release=to_struct({"stableRevision": 9})),
            metadata=op,
        )
    )
    stored = await api.releases.GetRelease(pb.GetReleaseRequest(agent_name="helper"), metadata=op)

    proposed = [from_struct(o) for o in preview.proposed]
    current = [from_struct(o) for o in preview.current]
    assert all({"apiVersion", "kind", "metadata", "spec"} <= set(o) for o in proposed + current)
    assert "25" in json.dumps(proposed) and "25" not in json.dumps(current)
    assert unknown_revision.code() == grpc.StatusCode.NOT_FOUND
    assert not stored.HasField("release")


async def test_render_mesh_lists_the_istio_objects_of_every_agent(api: Api) -> None:
    for name in ("alpha", "bravo"):
        await api.agents.ApplyAgent(
            pb.ApplyAgentRequest(manifest=to_struct(_agent(name))), metadata=api.as_("admin")
        )

    rendered = await api.mesh.RenderMesh(pb.RenderMeshRequest(), metadata=api.as_("viewer"))

    names = {from_struct(o)["metadata"]["name"] for o in rendered.objects}
    assert any("alpha" in n for n in names) and any("bravo" in n for n in names)


# ---------------------------------------------------------------- grants, secrets gc


async def test_grants_share_list_and_unshare(api: Api) -> None:
    sa = api.as_("secrets-admin")
    secret = "vault://secret/specmesh/shared/search"

    shared = await api.grants.ShareSecret(
        pb.ShareSecretRequest(agent_name="helper", secret=f"{secret}#apiKey"), metadata=sa
    )
    listed = await api.grants.ListGrants(
        pb.ListGrantsRequest(agent_name="helper"), metadata=api.as_("viewer")
    )
    own = await _error(
        api.grants.ShareSecret(
            pb.ShareSecretRequest(
                agent_name="helper", secret="vault://secret/specmesh/agents/other/llm"
            ),
            metadata=sa,
        )
    )
    denied = await _error(
        api.grants.ShareSecret(
            pb.ShareSecretRequest(agent_name="helper", secret=secret), metadata=api.as_("admin")
        )
    )
    unshared = await api.grants.UnshareSecret(
        pb.UnshareSecretRequest(agent_name="helper", secret=secret), metadata=sa
    )
    again = await _error(
        api.grants.UnshareSecret(
            pb.UnshareSecretRequest(agent_name="helper", secret=secret), metadata=sa
        )
    )
    after = await api.grants.ListGrants(pb.ListGrantsRequest(), metadata=sa)

    assert (shared.agent_name, shared.secret) == ("helper", secret)
    (grant,) = listed.grants
    assert (grant.agent_name, grant.secret, grant.path) == (
        "helper",
        secret,
        "specmesh/shared/search",
    )
    assert grant.granted_by == "user-secrets-admin" and grant.HasField("granted_at")
    assert own.code() == grpc.StatusCode.INVALID_ARGUMENT and own.details().startswith("secret: ")
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    assert unshared.secret == secret and again.code() == grpc.StatusCode.NOT_FOUND
    assert list(after.grants) == []


async def test_collect_secret_garbage_checks_the_grace_and_reports(api: Api) -> None:
    sa = api.as_("secrets-admin")

    report = await api.credentials.CollectSecretGarbage(
        pb.CollectSecretGarbageRequest(), metadata=sa
    )
    too_short = await _error(
        api.credentials.CollectSecretGarbage(
            pb.CollectSecretGarbageRequest(grace_seconds=10), metadata=sa
        )
    )
    denied = await _error(
        api.credentials.CollectSecretGarbage(
            pb.CollectSecretGarbageRequest(), metadata=api.as_("admin")
        )
    )

    assert list(report.destroyed) == [] and report.kept >= 0
    assert too_short.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert too_short.details().startswith("grace_seconds: ")
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED


# ---------------------------------------------------------------- traces, usage, prompt stats


async def _seed_trace(api: Api) -> None:
    resource = {"specmesh.agent.name": "helper", "service.name": "helper"}
    await api.traces.add_spans(
        [
            Span(
                trace_id=TRACE,
                span_id="eee19b7ec3c1b174",
                parent_span_id=None,
                name="invoke_agent helper",
                kind="SERVER",
                start_ns=START_NS,
                end_ns=START_NS + 100_000_000,
                agent="helper",
                attributes={
                    "gen_ai.operation.name": "invoke_agent",
                    "gen_ai.conversation.id": "c1",
                    "specmesh.prompt.key": "p",
                    "specmesh.prompt.version": "1.0.0",
                    "gen_ai.usage.input_tokens": 12,
                    "gen_ai.usage.output_tokens": 5,
                },
                resource=resource,
            ),
            Span(
                trace_id=TRACE,
                span_id="aaa19b7ec3c1b174",
                parent_span_id="eee19b7ec3c1b174",
                name="chat m",
                kind="CLIENT",
                start_ns=START_NS + 10_000_000,
                end_ns=START_NS + 90_000_000,
                status="ERROR",
                agent="helper",
                attributes={
                    "gen_ai.operation.name": "chat",
                    "gen_ai.request.model": "gpt-4o-mini",
                    "gen_ai.usage.input_tokens": 12,
                    "gen_ai.usage.output_tokens": 5,
                },
                resource=resource,
            ),
        ]
    )


async def test_traces_list_get_and_token_usage(api: Api) -> None:
    await _seed_trace(api)
    viewer = api.as_("viewer")

    listed = await api.trace.ListTraces(
        pb.ListTracesRequest(agent_name="helper", context_id="c1"), metadata=viewer
    )
    other = await api.trace.ListTraces(pb.ListTracesRequest(agent_name="nobody"), metadata=viewer)
    trace = await api.trace.GetTrace(pb.GetTraceRequest(trace_id=TRACE), metadata=viewer)
    bad_id = await _error(api.trace.GetTrace(pb.GetTraceRequest(trace_id="xyz"), metadata=viewer))
    usage = await api.trace.GetTokenUsage(
        pb.GetTokenUsageRequest(group_by=["model"]), metadata=viewer
    )
    bad_key = await _error(
        api.trace.GetTokenUsage(pb.GetTokenUsageRequest(group_by=["colour"]), metadata=viewer)
    )

    (summary,) = listed.traces
    assert (summary.trace_id, summary.span_count, summary.error) == (TRACE, 2, True)
    assert summary.start_time.ToNanoseconds() == START_NS and summary.duration_ms == 100.0
    assert list(other.traces) == []
    root, chat = trace.spans
    assert (root.parent_span_id, chat.parent_span_id) == ("", root.span_id)
    assert from_struct(chat.attributes)["gen_ai.usage.input_tokens"] == 12
    assert chat.status == "ERROR" and chat.end_time_unix_nano == START_NS + 90_000_000
    assert bad_id.code() == grpc.StatusCode.INVALID_ARGUMENT
    (row,) = usage.rows
    assert (row.model, row.agent, row.day, row.calls) == ("gpt-4o-mini", "", "", 1)
    assert (row.input_tokens, row.output_tokens, row.total_tokens) == (12, 5, 17)
    assert row.cost_usd > 0
    assert bad_key.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_prompt_stats_count_the_turns_of_each_version(api: Api) -> None:
    await _seed_trace(api)

    stats = await api.prompts.GetPromptStats(
        pb.GetPromptStatsRequest(prompt_key="p"), metadata=api.as_("viewer")
    )
    later = await api.prompts.GetPromptStats(
        pb.GetPromptStatsRequest(prompt_key="p", since=_ts(datetime(2027, 1, 1, tzinfo=UTC))),
        metadata=api.as_("viewer"),
    )
    too_many = await _error(
        api.prompts.GetPromptStats(
            pb.GetPromptStatsRequest(prompt_key="p", trace_limit=1001), metadata=api.as_("viewer")
        )
    )

    (version,) = stats.versions
    assert (version.version, version.requests, version.errors) == ("1.0.0", 1, 0)
    assert (version.input_tokens, version.output_tokens, list(version.agents)) == (
        12,
        5,
        ["helper"],
    )
    assert version.latency_p50_ms == version.latency_p95_ms == 100.0
    assert list(later.versions) == []
    assert too_many.details().startswith("trace_limit: ")


# ---------------------------------------------------------------- API tokens


async def test_api_tokens_create_list_revoke(api: Api) -> None:
    sa = api.as_("secrets-admin")

    created = await api.tokens.CreateToken(
        pb.CreateTokenRequest(name="ci-bot", roles=["secrets-admin"], ttl_seconds=3600),
        metadata=sa,
    )
    me = await api.identity.WhoAmI(
        pb.WhoAmIRequest(), metadata=(("authorization", f"Bearer {created.token}"),)
    )
    too_much = await _error(
        api.tokens.CreateToken(pb.CreateTokenRequest(name="x", roles=["admin"]), metadata=sa)
    )
    no_roles = await _error(api.tokens.CreateToken(pb.CreateTokenRequest(name="x"), metadata=sa))
    revoked = await api.tokens.RevokeToken(
        pb.RevokeTokenRequest(token_id=created.api_token.id), metadata=sa
    )
    listed = await api.tokens.ListTokens(pb.ListTokensRequest(), metadata=sa)

    t = created.api_token
    assert (t.name, list(t.roles), t.source, t.state, t.created_by) == (
        "ci-bot",
        ["secrets-admin"],
        "api",
        "active",
        "user-secrets-admin",
    )
    assert t.expires_at.ToDatetime(tzinfo=UTC) - t.created_at.ToDatetime(tzinfo=UTC) == timedelta(
        hours=1
    )
    assert me.name == "ci-bot"
    assert too_much.code() == grpc.StatusCode.PERMISSION_DENIED
    assert no_roles.code() == grpc.StatusCode.INVALID_ARGUMENT and "roles" in no_roles.details()
    assert (revoked.api_token.state, revoked.api_token.revoked_by) == (
        "revoked",
        "user-secrets-admin",
    )
    assert created.token not in str(listed)
    assert {x.id: x.state for x in listed.api_tokens}[t.id] == "revoked"


# ---------------------------------------------------------------- paging, filtering


async def test_instances_page_and_filter_by_agent(api: Api, store: SpecStore) -> None:
    for agent, instance in (("bravo", "i-2"), ("alpha", "i-1"), ("bravo", "i-1")):
        entry = {"instance": instance, "agent": agent, "endpoint": "https://10.0.0.7:8443"}
        await store.etcd.put(store.keys.registry_instance(agent, instance), dumps(entry))
    viewer = api.as_("viewer")

    first = await api.registry.ListInstances(pb.ListInstancesRequest(page_size=2), metadata=viewer)
    rest = await api.registry.ListInstances(
        pb.ListInstancesRequest(page_size=2, page_token=first.next_page_token), metadata=viewer
    )
    bravo = await api.registry.ListInstances(
        pb.ListInstancesRequest(agent_name="bravo"), metadata=viewer
    )
    negative = await _error(
        api.registry.ListInstances(pb.ListInstancesRequest(page_size=-1), metadata=viewer)
    )

    pairs = [(i.agent_name, i.instance_id) for i in [*first.instances, *rest.instances]]
    assert pairs == [("alpha", "i-1"), ("bravo", "i-1"), ("bravo", "i-2")]
    assert first.next_page_token and rest.next_page_token == ""
    assert [i.instance_id for i in bravo.instances] == ["i-1", "i-2"]
    assert negative.details().startswith("page_size: ")


async def test_audit_since_and_until_bound_the_entries(api: Api) -> None:
    await api.agents.ApplyAgent(
        pb.ApplyAgentRequest(manifest=to_struct(_agent())), metadata=api.as_("operator")
    )
    admin = api.as_("admin")
    now = datetime.now(UTC)

    recent = await api.audit.ListAuditEntries(
        pb.ListAuditEntriesRequest(name="helper", since=_ts(now - timedelta(hours=1))),
        metadata=admin,
    )
    future = await api.audit.ListAuditEntries(
        pb.ListAuditEntriesRequest(name="helper", since=_ts(now + timedelta(hours=1))),
        metadata=admin,
    )
    past = await api.audit.ListAuditEntries(
        pb.ListAuditEntriesRequest(name="helper", until=_ts(now - timedelta(hours=1))),
        metadata=admin,
    )

    assert [e.kind for e in recent.entries] == ["Agent"]
    assert list(future.entries) == list(past.entries) == []


# ---------------------------------------------------------------- without gRPC


async def test_servicer_invoke_runs_an_rpc_for_a_principal_and_raises_the_api_errors(
    api: Api,
) -> None:
    servicers = build_servicers(api.cp, StaticTokenAuthenticator({}))
    agents = servicers["specmesh.v1.AgentService"]
    operator = Principal("op", frozenset({Role.OPERATOR}))
    viewer = Principal("v", frozenset({Role.VIEWER}))

    applied = await agents.invoke(
        "ApplyAgent", operator, pb.ApplyAgentRequest(manifest=to_struct(_agent()))
    )

    assert isinstance(applied, pb.ApplyAgentResponse) and applied.agent.revision_info.revision == 1
    assert set(servicers) == {s.full_name for s in pb.DESCRIPTOR.services_by_name.values()}
    with pytest.raises(PermissionDeniedError):
        await agents.invoke(
            "ApplyAgent", viewer, pb.ApplyAgentRequest(manifest=to_struct(_agent()))
        )
