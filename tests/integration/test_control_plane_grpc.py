"""The control plane's gRPC API with real etcd and OpenBao, over loopback with the generated
stubs: the same ControlPlane, roles and error table as REST."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc
import pytest
from google.protobuf.struct_pb2 import Value
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from control_plane.api import MASK, ControlPlane
from control_plane.grpc_api import (
    REASON_METADATA,
    SERVICE_NAMES,
    build_grpc_server,
    from_struct,
    to_struct,
)
from specmesh.ports import free_port
from specmesh.store import SpecStore, dumps
from specmesh.v1 import common_pb2
from specmesh.v1 import control_plane_pb2 as pb
from specmesh.v1 import control_plane_pb2_grpc as pb_grpc
from specmesh.vault import VaultClient
from specmesh.workloads import AgentStatus, InstanceStatus, TrackStatus

from ..conftest import publish_prompt
from .release_support import observe_tracks
from .role_tokens import ROLE_TOKENS, role_authenticator

pytestmark = pytest.mark.integration

TOKENS = ROLE_TOKENS
PLANTED = "sk-planted-canary-grpc-91"
AGENT: dict[str, Any] = {
    "apiVersion": "specmesh.io/v1",
    "kind": "Agent",
    "metadata": {"name": "helper"},
    "spec": {
        "base": {"description": "d", "promptKey": "p"},
        "model": {"model": "m", "apiKey": PLANTED},
    },
}
CARD = {"name": "helper", "version": "1", "url": "https://10.0.0.7:8443/"}


def _doc(name: str = "helper", model: str = "m") -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(json.dumps(AGENT))
    doc["metadata"]["name"] = name
    doc["spec"]["model"]["model"] = model
    return doc


def _agent(name: str = "helper", model: str = "m") -> Any:
    return to_struct(_doc(name, model))


class Api:
    """Stubs of every service on one channel, and the caller's metadata per role."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.agents = pb_grpc.AgentServiceStub(channel)
        self.prompts = pb_grpc.PromptServiceStub(channel)
        self.mcp = pb_grpc.McpRegistryServiceStub(channel)
        self.registry = pb_grpc.AgentRegistryServiceStub(channel)
        self.releases = pb_grpc.ReleaseServiceStub(channel)
        self.credentials = pb_grpc.CredentialServiceStub(channel)
        self.audit = pb_grpc.AuditServiceStub(channel)
        self.identity = pb_grpc.IdentityServiceStub(channel)
        self.manifests = pb_grpc.ManifestServiceStub(channel)
        self.grants = pb_grpc.GrantServiceStub(channel)
        self.mesh = pb_grpc.MeshServiceStub(channel)
        self.trace = pb_grpc.TraceServiceStub(channel)
        self.tokens = pb_grpc.TokenServiceStub(channel)

    @staticmethod
    def as_(role: str | None) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {TOKENS[role]}"),) if role else ()


@pytest.fixture
async def api(store: SpecStore, vault: VaultClient) -> AsyncIterator[Api]:
    await publish_prompt(store)
    authenticator = role_authenticator()

    async def fetch_card(instance: Mapping[str, Any]) -> dict[str, Any]:
        return {**CARD, "url": instance["endpoint"]}

    cp = ControlPlane(store=store, vault=vault, card_fetcher=fetch_card)
    address = f"127.0.0.1:{free_port()}"
    server = await build_grpc_server(cp, authenticator, address)
    await server.start()
    async with grpc.aio.insecure_channel(address) as channel:
        yield Api(channel)
    await server.stop(None)


async def _status(call: Awaitable[Any]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


async def _error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


# ---------------------------------------------------------------- agents


async def test_apply_moves_the_plaintext_key_to_vault_and_get_shows_only_the_reference(
    api: Api,
) -> None:
    applied = await api.agents.ApplyAgent(
        pb.ApplyAgentRequest(manifest=_agent(), message="first"),
        metadata=api.as_("operator"),
    )
    got = await api.agents.GetAgent(
        pb.GetAgentRequest(agent_name="helper"), metadata=api.as_("viewer")
    )

    assert applied.created_revision and applied.agent.revision_info.revision == 1
    assert got.agent.revision_info.author == "user-operator"
    assert got.agent.revision_info.message == "first"
    assert got.agent.revision_info.HasField("created_at")
    api_key = from_struct(got.agent.spec)["model"]["apiKey"]
    assert api_key.startswith("vault://") and "#value@" in api_key  # pinned to its version
    assert PLANTED not in str(applied) + str(got)
    assert {c.path for c in applied.changes} >= {"model"}


async def test_list_agents_pages_by_name(api: Api) -> None:
    for name in ("charlie", "alpha", "bravo"):
        await api.agents.ApplyAgent(
            pb.ApplyAgentRequest(manifest=_agent(name)), metadata=api.as_("admin")
        )
    first = await api.agents.ListAgents(
        pb.ListAgentsRequest(page_size=2), metadata=api.as_("viewer")
    )
    second = await api.agents.ListAgents(
        pb.ListAgentsRequest(page_size=2, page_token=first.next_page_token),
        metadata=api.as_("viewer"),
    )
    everything = await api.agents.ListAgents(pb.ListAgentsRequest(), metadata=api.as_("viewer"))

    assert [a.name for a in first.agents] == ["alpha", "bravo"] and first.next_page_token
    assert [a.name for a in second.agents] == ["charlie"] and second.next_page_token == ""
    assert [a.name for a in everything.agents] == ["alpha", "bravo", "charlie"]
    assert all(from_struct(a.spec)["model"]["model"] == "m" for a in everything.agents)
    bad = await _error(
        api.agents.ListAgents(pb.ListAgentsRequest(page_token="nope"), metadata=api.as_("viewer"))
    )
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in bad.details()


async def test_a_manifest_nested_past_protobufs_recursion_limit_never_reaches_the_api(
    api: Api, store: SpecStore
) -> None:
    doc = _doc()
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(60):  # 60 JSON levels: 180 nested messages, past protobuf's 100
        node["a"] = {}
        node = node["a"]
    doc["spec"]["base"]["labels"] = deep
    request = pb.ApplyAgentRequest()
    request.manifest.update(doc)

    code = await _status(api.agents.ApplyAgent(request, metadata=api.as_("admin")))

    assert code != grpc.StatusCode.OK
    assert await store.current_revision("helper") == 0


async def test_history_diff_and_rollback(api: Api) -> None:
    op = api.as_("operator")
    for model in ("m1", "m2"):
        await api.agents.ApplyAgent(pb.ApplyAgentRequest(manifest=_agent(model=model)), metadata=op)

    history = await api.agents.ListAgentRevisions(
        pb.ListAgentRevisionsRequest(agent_name="helper"), metadata=op
    )
    diff = await api.agents.DiffAgentRevisions(
        pb.DiffAgentRevisionsRequest(agent_name="helper", from_revision=1), metadata=op
    )
    rolled = await api.agents.RollbackAgent(
        pb.RollbackAgentRequest(
            agent_name="helper", revision=1, expected_revision=2, message="m2 is slow"
        ),
        metadata=op,
    )
    stale = await _error(
        api.agents.RollbackAgent(
            pb.RollbackAgentRequest(agent_name="helper", revision=1, expected_revision=2),
            metadata=op,
        )
    )

    assert [r.revision for r in history.revisions] == [2, 1]
    model_change = next(c for c in diff.changes if c.path == "model.model")
    assert (model_change.op, model_change.old_value, model_change.new_value) == (
        common_pb2.CHANGE_OP_REPLACE,
        Value(string_value="m1"),
        Value(string_value="m2"),
    )
    assert rolled.agent.revision_info.revision == 3
    assert from_struct(rolled.agent.spec)["model"]["model"] == "m1"
    assert rolled.agent.revision_info.message == "rollback to revision 1: m2 is slow"
    assert stale.code() == grpc.StatusCode.ABORTED


async def test_delete_agent_then_get_is_not_found(api: Api) -> None:
    await api.agents.ApplyAgent(pb.ApplyAgentRequest(manifest=_agent()), metadata=api.as_("admin"))
    await api.agents.DeleteAgent(
        pb.DeleteAgentRequest(agent_name="helper"), metadata=api.as_("admin")
    )
    code = await _status(
        api.agents.GetAgent(pb.GetAgentRequest(agent_name="helper"), metadata=api.as_("viewer"))
    )
    assert code == grpc.StatusCode.NOT_FOUND


# ---------------------------------------------------------------- status, scale

OBSERVED = AgentStatus(
    agent="helper",
    revision=1,
    runtime="local",
    tracks={"stable": TrackStatus(desired=2, ready=1), "canary": TrackStatus(desired=1)},
    instances=[
        InstanceStatus(
            instance="helper-stable-0",
            track="stable",
            phase="Running",
            ready=True,
            revision=1,
            since="2025-01-02T03:04:05+00:00",
            endpoints={"a2a": "http://127.0.0.1:9101", "ops": "http://127.0.0.1:9102"},
        ),
        InstanceStatus(instance="helper-stable-1", track="stable", phase="Starting"),
        InstanceStatus(
            instance="helper-canary-0",
            track="canary",
            phase="CrashLoop",
            restarts=4,
            last_error="engine exited with 1",
        ),
    ],
    phase="CrashLoop",
    last_error="engine exited with 1",
    observed_at="2025-01-02T03:04:10+00:00",
)


async def test_agent_status_comes_back_typed_and_listed_in_short(
    api: Api, store: SpecStore
) -> None:
    for name in ("helper", "other"):
        await api.agents.ApplyAgent(
            pb.ApplyAgentRequest(manifest=_agent(name)), metadata=api.as_("admin")
        )
    await store.put_status("helper", OBSERVED.to_json())  # what the controller writes

    got = await api.agents.GetAgentStatus(
        pb.GetAgentStatusRequest(agent_name="helper"), metadata=api.as_("viewer")
    )
    listed = await api.agents.ListAgents(pb.ListAgentsRequest(), metadata=api.as_("viewer"))

    s = got.status
    assert (s.agent_name, s.revision, s.runtime, s.phase) == ("helper", 1, "local", "CrashLoop")
    assert (s.ready_replicas, s.desired_replicas) == (1, 3)
    assert {k: (t.desired, t.ready) for k, t in s.tracks.items()} == {
        "stable": (2, 1),
        "canary": (1, 0),
    }
    assert s.last_error == "engine exited with 1" and s.observed_at.seconds == 1735787050
    running, starting, crashing = s.instances
    assert (running.instance_id, running.phase, running.ready, running.serving_revision) == (
        "helper-stable-0",
        "Running",
        True,
        1,
    )
    assert running.since.seconds == 1735787045 and running.endpoints["a2a"].endswith(":9101")
    assert (starting.phase, starting.ready, starting.HasField("since")) == (
        "Starting",
        False,
        False,
    )
    assert (crashing.track, crashing.restarts, crashing.last_error) == (
        "canary",
        4,
        "engine exited with 1",
    )
    helper, other = listed.agents
    assert (helper.status.phase, helper.status.ready_replicas, helper.status.desired_replicas) == (
        "CrashLoop",
        1,
        3,
    )
    assert other.name == "other" and not other.HasField("status")


async def test_agent_status_without_a_controller_is_not_running(api: Api) -> None:
    await api.agents.ApplyAgent(pb.ApplyAgentRequest(manifest=_agent()), metadata=api.as_("admin"))

    got = await api.agents.GetAgentStatus(
        pb.GetAgentStatusRequest(agent_name="helper"), metadata=api.as_("viewer")
    )

    s = got.status
    assert (s.agent_name, s.phase, s.ready_replicas, s.desired_replicas) == (
        "helper",
        "NotRunning",
        0,
        0,
    )
    assert not s.tracks and not s.instances and not s.HasField("observed_at")
    assert "no controller reported" in s.last_error


async def test_scale_agent_writes_a_new_revision_of_the_deployment_part(api: Api) -> None:
    op = api.as_("operator")
    await api.agents.ApplyAgent(pb.ApplyAgentRequest(manifest=_agent()), metadata=op)

    scaled = await api.agents.ScaleAgent(
        pb.ScaleAgentRequest(agent_name="helper", replicas=3, expected_revision=1), metadata=op
    )
    canary = await api.agents.ScaleAgent(
        pb.ScaleAgentRequest(agent_name="helper", replicas=1, track="canary"), metadata=op
    )
    again = await api.agents.ScaleAgent(
        pb.ScaleAgentRequest(agent_name="helper", replicas=1, track="canary"), metadata=op
    )
    stale = await _error(
        api.agents.ScaleAgent(
            pb.ScaleAgentRequest(agent_name="helper", replicas=2, expected_revision=1), metadata=op
        )
    )
    got = await api.agents.GetAgent(pb.GetAgentRequest(agent_name="helper"), metadata=op)

    assert scaled.created_revision and scaled.agent.revision_info.revision == 2
    assert scaled.agent.revision_info.author == "user-operator"
    tracks = from_struct(scaled.agent.spec)["deployment"]["tracks"]
    assert tracks["stable"]["replicas"] == 3
    assert any(c.path.startswith("deployment") for c in scaled.changes)
    assert canary.agent.revision_info.revision == 3
    canary_track = from_struct(canary.agent.spec)["deployment"]["tracks"]["canary"]
    assert (canary_track["replicas"], canary_track["enabled"]) == (1, True)
    assert not again.created_revision and again.agent.revision_info.revision == 3
    assert stale.code() == grpc.StatusCode.ABORTED
    assert got.agent.revision_info.revision == 3
    assert from_struct(got.agent.spec)["deployment"]["tracks"]["stable"]["replicas"] == 3
    assert PLANTED not in str(scaled) + str(got)


async def test_scale_agent_is_refused_to_a_viewer(api: Api) -> None:
    await api.agents.ApplyAgent(pb.ApplyAgentRequest(manifest=_agent()), metadata=api.as_("admin"))

    error = await _error(
        api.agents.ScaleAgent(
            pb.ScaleAgentRequest(agent_name="helper", replicas=2), metadata=api.as_("viewer")
        )
    )
    got = await api.agents.GetAgent(
        pb.GetAgentRequest(agent_name="helper"), metadata=api.as_("viewer")
    )

    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (REASON_METADATA, "permission_denied") in tuple(error.trailing_metadata() or ())
    assert got.agent.revision_info.revision == 1


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.ScaleAgentRequest(agent_name="helper", replicas=-1), "replicas"),
        (pb.ScaleAgentRequest(agent_name="helper", replicas=101), "replicas"),
        (pb.ScaleAgentRequest(agent_name="helper"), "replicas"),
        (pb.ScaleAgentRequest(agent_name="helper", replicas=1, track="blue"), "track"),
        (pb.ScaleAgentRequest(replicas=1), "agent_name"),
    ],
    ids=["negative", "over-100", "unset", "unknown-track", "no-agent-name"],
)
async def test_bad_scale_is_invalid_argument_naming_the_field(
    api: Api, request_: Any, field: str
) -> None:
    op = api.as_("operator")
    await api.agents.ApplyAgent(pb.ApplyAgentRequest(manifest=_agent()), metadata=op)

    error = await _error(api.agents.ScaleAgent(request_, metadata=op))
    got = await api.agents.GetAgent(pb.GetAgentRequest(agent_name="helper"), metadata=op)

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(f"{field}: "), error.details()
    assert got.agent.revision_info.revision == 1


async def test_status_and_scale_of_an_unknown_agent_are_not_found(api: Api) -> None:
    status = await _status(
        api.agents.GetAgentStatus(
            pb.GetAgentStatusRequest(agent_name="nobody"), metadata=api.as_("viewer")
        )
    )
    scale = await _status(
        api.agents.ScaleAgent(
            pb.ScaleAgentRequest(agent_name="nobody", replicas=1), metadata=api.as_("operator")
        )
    )

    assert status == scale == grpc.StatusCode.NOT_FOUND


# ---------------------------------------------------------------- releases


async def test_release_set_promote_and_abort(api: Api, store: SpecStore) -> None:
    op = api.as_("operator")
    for model in ("m1", "m2"):
        await api.agents.ApplyAgent(pb.ApplyAgentRequest(manifest=_agent(model=model)), metadata=op)
    await observe_tracks(store, "helper", canary=1)
    none_yet = await api.releases.GetRelease(pb.GetReleaseRequest(agent_name="helper"), metadata=op)

    dry = await api.releases.SetRelease(
        pb.SetReleaseRequest(
            agent_name="helper",
            release=to_struct({"canaryRevision": 2, "canaryWeight": 5}),
            dry_run=True,
        ),
        metadata=op,
    )
    still_none = await api.releases.GetRelease(
        pb.GetReleaseRequest(agent_name="helper"), metadata=op
    )
    set_ = await api.releases.SetRelease(
        pb.SetReleaseRequest(
            agent_name="helper",
            release=to_struct(
                {
                    "stableRevision": 1,
                    "canaryRevision": 2,
                    "canaryWeight": 10,
                    "headerMatch": [{"name": "x-canary", "exact": "yes"}],
                    "timeoutSeconds": 30,
                }
            ),
            message="10% to m2",
        ),
        metadata=op,
    )
    got = await api.releases.GetRelease(pb.GetReleaseRequest(agent_name="helper"), metadata=op)
    promoted = await api.releases.PromoteRelease(
        pb.PromoteReleaseRequest(agent_name="helper"), metadata=op
    )
    no_canary = await _error(
        api.releases.AbortRelease(pb.AbortReleaseRequest(agent_name="helper"), metadata=op)
    )

    assert not none_yet.HasField("release") and not still_none.HasField("release")
    assert dry.release.canary_weight == 5
    r = got.release
    assert (r.stable_revision, r.canary_revision, r.canary_weight) == (1, 2, 10)
    assert r.header_match[0].WhichOneof("match") == "exact" and r.header_match[0].exact == "yes"
    assert from_struct(r.spec)["timeoutSeconds"] == 30
    assert r.updated_by == "user-operator" and r.HasField("updated_at")
    assert set_.release == got.release and got.release.version == 1
    assert dry.release.version == 0  # a dry run writes nothing
    p = promoted.release
    assert (p.stable_revision, p.HasField("canary_revision"), p.canary_weight) == (2, False, 0)
    assert p.version == 2
    assert no_canary.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "has no canary" in no_canary.details()


async def test_release_fields_are_validated(api: Api) -> None:
    op = api.as_("operator")
    await api.agents.ApplyAgent(pb.ApplyAgentRequest(manifest=_agent()), metadata=op)

    no_revision = await _error(
        api.releases.SetRelease(
            pb.SetReleaseRequest(agent_name="helper", release=to_struct({"canaryWeight": 10})),
            metadata=op,
        )
    )
    unknown = await _error(
        api.releases.SetRelease(
            pb.SetReleaseRequest(agent_name="helper", release=to_struct({"canaryWait": 3})),
            metadata=op,
        )
    )

    assert no_revision.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "canaryRevision is required" in no_revision.details()
    assert unknown.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "canaryWait" in unknown.details()


# ---------------------------------------------------------------- credentials


async def test_put_credential_returns_the_reference_and_list_never_the_value(api: Api) -> None:
    folder = f"specmesh/shared/g{uuid.uuid4().hex[:8]}"
    sa = api.as_("secrets-admin")
    put = await api.credentials.PutCredential(
        pb.PutCredentialRequest(path=f"{folder}/db", field="password", value="v-grpc-secret-3"),
        metadata=sa,
    )
    await api.credentials.PutCredential(
        pb.PutCredentialRequest(path=f"{folder}/api", field="token", value="v-grpc-secret-4"),
        metadata=sa,
    )
    listed = await api.credentials.ListCredentials(
        pb.ListCredentialsRequest(path_prefix=f"{folder}/d"), metadata=sa
    )
    everything = await api.credentials.ListCredentials(
        pb.ListCredentialsRequest(path_prefix=folder, page_size=1), metadata=sa
    )

    c = put.credential
    assert c.reference == f"vault://secret/{folder}/db#password"
    assert (c.masked_value, c.version, c.updated_by) == (MASK, 1, "user-secrets-admin")
    assert [x.reference for x in listed.credentials] == [c.reference]
    assert len(everything.credentials) == 1 and everything.next_page_token
    assert {x.masked_value for x in listed.credentials} == {MASK}
    assert "v-grpc-secret" not in str(put) + str(listed) + str(everything)


# ---------------------------------------------------------------- prompts, registries, audit


async def test_prompt_publish_get_and_release(api: Api) -> None:
    op = api.as_("operator")
    for version in ("1.0.0", "1.1.0"):
        manifest = {
            "apiVersion": "specmesh.io/v1",
            "kind": "Prompt",
            "metadata": {"name": "greeting"},
            "spec": {"version": version, "template": f"Hello {version}"},
        }
        published = await api.prompts.PublishPromptVersion(
            pb.PublishPromptVersionRequest(manifest=to_struct(manifest)), metadata=op
        )
    released = await api.prompts.SetPromptRelease(
        pb.SetPromptReleaseRequest(
            prompt_key="greeting",
            release=pb.PromptRelease(labels={"prod": "1.0.0"}, weights={"1.0.0": 80, "1.1.0": 20}),
        ),
        metadata=op,
    )
    got = await api.prompts.GetPrompt(
        pb.GetPromptRequest(prompt_key="greeting", version="1.1.0"), metadata=api.as_("viewer")
    )
    listed = await api.prompts.ListPrompts(pb.ListPromptsRequest(), metadata=api.as_("viewer"))

    assert published.prompt_version.author == "user-operator"
    assert list(published.prompt.versions) == ["1.0.0", "1.1.0"]
    assert dict(released.prompt.release.weights) == {"1.0.0": 80, "1.1.0": 20}
    assert [v.version for v in got.versions] == ["1.1.0"]
    assert from_struct(got.versions[0].entry)["template"] == "Hello 1.1.0"
    assert [p.prompt_key for p in listed.prompts] == ["greeting", "p"]  # "p": the fixture's
    assert dict(listed.prompts[0].release.labels) == {"prod": "1.0.0"}


async def test_mcp_registry_register_get_and_list(api: Api) -> None:
    manifest = {
        "apiVersion": "specmesh.io/v1",
        "kind": "McpServer",
        "metadata": {"name": "time"},
        "spec": {"url": "http://127.0.0.1:9/mcp", "description": "clock"},
    }
    request = pb.RegisterMcpServerRequest(manifest=to_struct(manifest))
    denied = await _status(api.mcp.RegisterMcpServer(request, metadata=api.as_("operator")))
    registered = await api.mcp.RegisterMcpServer(request, metadata=api.as_("admin"))
    got = await api.mcp.GetMcpServer(
        pb.GetMcpServerRequest(mcp_server_name="time"), metadata=api.as_("viewer")
    )
    listed = await api.mcp.ListMcpServers(pb.ListMcpServersRequest(), metadata=api.as_("viewer"))
    missing = await _status(
        api.mcp.GetMcpServer(
            pb.GetMcpServerRequest(mcp_server_name="nope"), metadata=api.as_("viewer")
        )
    )

    assert denied == grpc.StatusCode.PERMISSION_DENIED
    assert registered.mcp_server == got.mcp_server
    assert from_struct(got.mcp_server.spec)["description"] == "clock"
    assert got.mcp_server.updated_by == "user-admin"
    assert [s.name for s in listed.mcp_servers] == ["time"]
    assert missing == grpc.StatusCode.NOT_FOUND


async def test_agent_registry_lists_live_instances_and_their_card(
    api: Api, store: SpecStore
) -> None:
    viewer = api.as_("viewer")
    no_instance = await _status(
        api.registry.GetAgentCard(pb.GetAgentCardRequest(agent_name="helper"), metadata=viewer)
    )
    entry = {
        "instance": "i-1",
        "agent": "helper",
        "endpoint": "https://10.0.0.7:8443",
        "track": "stable",
        "revision": 1,
        "state": "serving",
        "startedAt": "2025-01-02T03:04:05+00:00",
    }
    # what a sidecar registers (without the lease: this test does not let it expire)
    await store.etcd.put(store.keys.registry_instance("helper", "i-1"), dumps(entry))

    listed = await api.registry.ListInstances(pb.ListInstancesRequest(), metadata=viewer)
    card = await api.registry.GetAgentCard(
        pb.GetAgentCardRequest(agent_name="helper"), metadata=viewer
    )

    assert no_instance == grpc.StatusCode.NOT_FOUND
    (instance,) = listed.instances
    assert (instance.agent_name, instance.instance_id, instance.serving_revision) == (
        "helper",
        "i-1",
        1,
    )
    assert instance.state == common_pb2.ENGINE_STATE_SERVING
    assert instance.registered_at.seconds == 1735787045
    assert from_struct(card.agent_card)["url"] == "https://10.0.0.7:8443"


async def test_changes_are_audited_with_the_principal(api: Api, store: SpecStore) -> None:
    await api.agents.ApplyAgent(
        pb.ApplyAgentRequest(manifest=_agent()), metadata=api.as_("operator")
    )
    await observe_tracks(store, "helper", canary=1)
    await api.releases.SetRelease(
        pb.SetReleaseRequest(
            agent_name="helper", release=to_struct({"canaryRevision": 1, "canaryWeight": 20})
        ),
        metadata=api.as_("operator"),
    )
    entries = await api.audit.ListAuditEntries(
        pb.ListAuditEntriesRequest(name="helper"), metadata=api.as_("admin")
    )
    page = await api.audit.ListAuditEntries(
        pb.ListAuditEntriesRequest(kind="Agent", page_size=1), metadata=api.as_("admin")
    )

    assert [(e.actor, e.action, e.kind) for e in entries.entries][:2] == [
        ("user-operator", "release.set", "Release"),
        ("user-operator", "apply", "Agent"),
    ]
    assert any(c.path == "canaryWeight" for c in entries.entries[0].changes)
    assert entries.entries[1].revision == 1
    assert [e.kind for e in page.entries] == ["Agent"] and page.next_page_token == ""
    assert PLANTED not in str(entries)


# ---------------------------------------------------------------- roles, errors


Call = Callable[[Api, tuple[tuple[str, str], ...]], Awaitable[Any]]

CALLS: dict[str, Call] = {
    "list agents": lambda a, md: a.agents.ListAgents(pb.ListAgentsRequest(), metadata=md),
    "get agent": lambda a, md: a.agents.GetAgent(
        pb.GetAgentRequest(agent_name="helper"), metadata=md
    ),
    "apply agent": lambda a, md: a.agents.ApplyAgent(
        pb.ApplyAgentRequest(manifest=_agent()), metadata=md
    ),
    "agent status": lambda a, md: a.agents.GetAgentStatus(
        pb.GetAgentStatusRequest(agent_name="helper"), metadata=md
    ),
    "scale agent": lambda a, md: a.agents.ScaleAgent(
        pb.ScaleAgentRequest(agent_name="helper", replicas=2), metadata=md
    ),
    "set release": lambda a, md: a.releases.SetRelease(
        pb.SetReleaseRequest(
            agent_name="helper", release=to_struct({"canaryRevision": 1, "canaryWeight": 10})
        ),
        metadata=md,
    ),
    "list credentials": lambda a, md: a.credentials.ListCredentials(
        pb.ListCredentialsRequest(path_prefix="specmesh/"), metadata=md
    ),
    "put credential": lambda a, md: a.credentials.PutCredential(
        pb.PutCredentialRequest(path="specmesh/shared/x", field="token", value="v-secret-1"),
        metadata=md,
    ),
    "audit": lambda a, md: a.audit.ListAuditEntries(pb.ListAuditEntriesRequest(), metadata=md),
}

READ_CALLS = {"list agents", "get agent", "agent status"}
OPERATOR_CALLS = {"apply agent", "scale agent", "set release", "audit"}
ALLOWED = {
    "viewer": READ_CALLS,
    "operator": READ_CALLS | OPERATOR_CALLS,
    "admin": READ_CALLS | OPERATOR_CALLS,
    "secrets-admin": {"list credentials", "put credential", "audit"},
}


@pytest.mark.parametrize("role", list(TOKENS))
async def test_role_by_call_table_denies_by_default(api: Api, store: SpecStore, role: str) -> None:
    await api.agents.ApplyAgent(pb.ApplyAgentRequest(manifest=_agent()), metadata=api.as_("admin"))
    await observe_tracks(store, "helper", canary=1)
    outcomes = {name: await _status(call(api, api.as_(role))) for name, call in CALLS.items()}

    allowed = {n for n, code in outcomes.items() if code == grpc.StatusCode.OK}
    assert allowed == ALLOWED[role], outcomes
    assert all(
        outcomes[n] == grpc.StatusCode.PERMISSION_DENIED for n in set(CALLS) - ALLOWED[role]
    ), outcomes


async def test_no_or_unknown_token_is_unauthenticated(api: Api) -> None:
    for metadata in ((), (("authorization", "Bearer nope"),), (("authorization", "Basic x"),)):
        error = await _error(api.agents.ListAgents(pb.ListAgentsRequest(), metadata=metadata))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert (REASON_METADATA, "unauthenticated") in tuple(error.trailing_metadata() or ())


async def test_bad_manifest_is_invalid_argument_with_path_and_message(api: Api) -> None:
    bad = _doc()
    bad["spec"]["model"] = {"model": "m", "temperature": 7}
    error = await _error(
        api.agents.ApplyAgent(
            pb.ApplyAgentRequest(manifest=to_struct(bad)), metadata=api.as_("operator")
        )
    )
    missing = await _error(
        api.agents.ApplyAgent(pb.ApplyAgentRequest(), metadata=api.as_("operator"))
    )
    wrong_kind = await _error(
        api.agents.ApplyAgent(
            pb.ApplyAgentRequest(manifest=to_struct({"kind": "Prompt"})),
            metadata=api.as_("operator"),
        )
    )

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.model.temperature: must be <= 2 (got 7)" in error.details().splitlines()
    assert (REASON_METADATA, "invalid_spec") in tuple(error.trailing_metadata() or ())
    assert missing.code() == wrong_kind.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert missing.details() == "manifest: required"
    assert "kind must be 'Agent'" in wrong_kind.details()


# ---------------------------------------------------------------- health, reflection


async def test_health_is_serving_for_the_server_and_every_service(api: Api) -> None:
    stub = health_pb2_grpc.HealthStub(api.channel)
    for service in ("", *SERVICE_NAMES):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


async def test_reflection_lists_every_service(api: Api) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(api.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async for reply in stub.ServerReflectionInfo(iter([request])):
        names = {s.name for s in reply.list_services_response.service}
        break
    assert "specmesh.v1.AgentService" in names
    assert set(SERVICE_NAMES) <= names and len(SERVICE_NAMES) == 13


async def test_audit_by_name_with_a_credential_entry_present(api: Api) -> None:
    await api.agents.ApplyAgent(
        pb.ApplyAgentRequest(manifest=_agent()), metadata=api.as_("operator")
    )
    await api.credentials.PutCredential(
        pb.PutCredentialRequest(path="specmesh/shared/y", field="token", value="v-secret-5"),
        metadata=api.as_("secrets-admin"),
    )
    entries = await api.audit.ListAuditEntries(
        pb.ListAuditEntriesRequest(name="helper"), metadata=api.as_("admin")
    )
    assert [e.kind for e in entries.entries] == ["Agent"]


async def test_issue_invoke_token_is_the_rest_mint_over_grpc(api: Api, vault: VaultClient) -> None:
    import jwt

    from control_plane.issuer import TokenIssuer

    await api.agents.ApplyAgent(
        pb.ApplyAgentRequest(manifest=_agent()), metadata=api.as_("operator")
    )

    minted = await api.registry.IssueInvokeToken(
        pb.IssueInvokeTokenRequest(agent_name="helper"), metadata=api.as_("admin")
    )
    denied = await _status(
        api.registry.IssueInvokeToken(
            pb.IssueInvokeTokenRequest(agent_name="helper"), metadata=api.as_("viewer")
        )
    )
    unknown = await _status(
        api.registry.IssueInvokeToken(
            pb.IssueInvokeTokenRequest(agent_name="nobody"), metadata=api.as_("admin")
        )
    )

    assert (denied, unknown) == (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND)
    assert (minted.issuer, minted.subject, minted.audience) == ("specmesh", "user-admin", "helper")
    jwks = await TokenIssuer(vault=vault).jwks()  # the same key in Vault, whoever reads it
    key = jwt.PyJWKSet.from_dict(jwks)[jwt.get_unverified_header(minted.token)["kid"]].key
    claims = jwt.decode(
        minted.token, key, algorithms=["ES256"], audience="helper", issuer="specmesh"
    )
    assert claims["sub"] == "user-admin" and claims["exp"] == minted.expires_at.seconds
