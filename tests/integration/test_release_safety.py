"""Safe release changes, over real gRPC and real HTTP on one ControlPlane with real etcd
and OpenBao: a split to a track with no ready instance (as the controller last observed it,
or never observed) is refused unless allow_empty; a stale expected version is a conflict;
every release action is audited as itself with the policy before and after."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from aiohttp.test_utils import TestServer

from control_plane.api import ControlPlane
from control_plane.auth import Principal, Role
from control_plane.errors import TrackEmptyError
from control_plane.grpc_api import REASON_METADATA, build_grpc_server, build_servicers
from control_plane.http_api import build_app
from specmesh.errors import ConflictError
from specmesh.ports import free_port
from specmesh.protojson import from_struct, to_struct
from specmesh.spec.models import PromptEntry, ReleaseSpec
from specmesh.store import SpecStore
from specmesh.v1 import control_plane_pb2 as pb
from specmesh.v1 import control_plane_pb2_grpc as pb_grpc
from specmesh.vault import VaultClient

from ..conftest import publish_prompt
from .release_support import observe_tracks
from .role_tokens import ROLE_TOKENS, rest_call, role_authenticator

pytestmark = pytest.mark.integration

OPERATOR = (("authorization", f"Bearer {ROLE_TOKENS['operator']}"),)
OPS = Principal("ops", frozenset(Role))
SPLIT = {"stableRevision": 1, "canaryRevision": 2, "canaryWeight": 10}


@dataclass
class Api:
    cp: ControlPlane
    http: TestServer
    releases: pb_grpc.ReleaseServiceStub
    audit: pb_grpc.AuditServiceStub

    async def rest(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return await rest_call(self.http, method, path, ROLE_TOKENS["operator"], body)


@pytest.fixture
async def api(store: SpecStore, vault: VaultClient) -> AsyncIterator[Api]:
    """A control plane (no controller) with agent ``helper`` at revision 2."""
    await publish_prompt(store)
    authenticator = role_authenticator()
    cp = ControlPlane(store=store, vault=vault)
    for model in ("m1", "m2"):
        agent = {
            "apiVersion": "specmesh.io/v1",
            "kind": "Agent",
            "metadata": {"name": "helper"},
            "spec": {"base": {"description": "d", "promptKey": "p"}, "model": {"model": model}},
        }
        await cp.apply(OPS, agent)
    address = f"127.0.0.1:{free_port()}"
    grpc_server = await build_grpc_server(cp, authenticator, address)
    await grpc_server.start()
    http = TestServer(build_app(cp, authenticator, build_servicers(cp, authenticator)))
    await http.start_server()
    async with grpc.aio.insecure_channel(address) as channel:
        yield Api(cp, http, pb_grpc.ReleaseServiceStub(channel), pb_grpc.AuditServiceStub(channel))
    await http.close()
    await grpc_server.stop(None)


async def _grpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def _reason(error: grpc.aio.AioRpcError) -> str:
    return str(dict(error.trailing_metadata() or ()).get(REASON_METADATA, ""))


def _set(release: dict[str, Any], **fields: Any) -> pb.SetReleaseRequest:
    return pb.SetReleaseRequest(agent_name="helper", release=to_struct(release), **fields)


# ---------------------------------------------------------------- empty tracks


async def test_a_split_to_a_canary_with_no_ready_instance_is_refused_on_both_transports(
    api: Api, store: SpecStore
) -> None:
    await observe_tracks(store, "helper", stable=1, canary=0)

    error = await _grpc_error(api.releases.SetRelease(_set(SPLIT), metadata=OPERATOR))
    dry = await _grpc_error(api.releases.SetRelease(_set(SPLIT, dry_run=True), metadata=OPERATOR))
    header_only = {"canaryRevision": 2, "headerMatch": [{"name": "x-canary", "exact": "1"}]}
    by_header = await _grpc_error(api.releases.SetRelease(_set(header_only), metadata=OPERATOR))
    status, body = await api.rest("PUT", "/api/v1/agents/helper/release", SPLIT)

    assert (error.code(), _reason(error)) == (grpc.StatusCode.FAILED_PRECONDITION, "track_empty")
    message = error.details() or ""
    assert "sends 10% of calls to track canary, which has 0 ready of 1 desired" in message
    assert "--canary-revision 2 --weight 0" in message and "--allow-empty" in message
    assert dry.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "the calls matching its headerMatch to track canary" in (by_header.details() or "")
    assert (status, body["error"]["code"]) == (409, "track_empty")
    assert body["error"]["message"] == message
    assert await store.get_release("helper") is None  # nothing written


async def test_a_release_leaving_calls_on_an_empty_stable_is_refused(
    api: Api, store: SpecStore
) -> None:
    await observe_tracks(store, "helper", stable=0, canary=1)

    with pytest.raises(TrackEmptyError) as refused:
        await api.cp.set_release(OPS, "helper", ReleaseSpec.model_validate(SPLIT))
    everything = ReleaseSpec.model_validate({**SPLIT, "canaryWeight": 100})
    state = await api.cp.set_release(OPS, "helper", everything)  # stable gets no call

    assert (refused.value.track, refused.value.ready, refused.value.desired) == ("stable", 0, 1)
    assert "sends 90% of calls to track stable" in str(refused.value)
    assert state.version == 1 and await store.get_release("helper") == everything


async def test_allow_empty_sets_it_anyway_on_both_transports(api: Api, store: SpecStore) -> None:
    await observe_tracks(store, "helper", stable=1, canary=0)

    reply = await api.releases.SetRelease(_set(SPLIT, allow_empty=True), metadata=OPERATOR)
    status, body = await api.rest(
        "PUT", "/api/v1/agents/helper/release?allowEmpty=true", {**SPLIT, "canaryWeight": 20}
    )

    assert (reply.release.canary_weight, reply.release.version) == (10, 1)
    assert (status, body["release"]["canaryWeight"], body["release"]["version"]) == (200, 20, "2")
    assert (await store.get_release("helper")) == ReleaseSpec.model_validate(
        {**SPLIT, "canaryWeight": 20}
    )


async def test_no_observed_status_is_refused_as_unknown(
    api: Api, store: SpecStore, vault: VaultClient
) -> None:
    local = ControlPlane(store=store, vault=vault, runtime="local")
    spec = ReleaseSpec.model_validate(SPLIT)

    with pytest.raises(TrackEmptyError) as no_controller:
        await api.cp.set_release(OPS, "helper", spec)
    with pytest.raises(TrackEmptyError) as not_yet:
        await local.set_release(OPS, "helper", spec)
    await observe_tracks(store, "helper", stable=1, canary=1)
    observed = await local.set_release(OPS, "helper", spec)

    assert no_controller.value.ready is None and no_controller.value.desired is None
    assert "ready instances are unknown" in str(no_controller.value)
    assert "runs no controller (SPECMESH_RUNTIME=none)" in str(no_controller.value)
    assert "the controller has not reported on the agent yet" in str(not_yet.value)
    assert observed.version == 1


async def test_a_status_the_controller_stopped_updating_is_refused_as_stale(
    api: Api, store: SpecStore
) -> None:
    # a controller that died an hour ago still "reports" its last ready counts
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    await observe_tracks(store, "helper", stable=1, canary=1, observed_at=an_hour_ago)
    spec = ReleaseSpec.model_validate(SPLIT)

    with pytest.raises(TrackEmptyError) as stale:
        await api.cp.set_release(OPS, "helper", spec)
    await observe_tracks(store, "helper", stable=1, canary=1)  # observed again: now
    fresh = await api.cp.set_release(OPS, "helper", spec)

    assert stale.value.ready is None
    assert re.search(r"the controller last observed it 36\d\d s ago", str(stale.value))
    assert "is the control plane's controller running?" in str(stale.value)
    assert fresh.version == 1


async def test_promote_and_abort_are_not_refused_for_an_empty_track(
    api: Api, store: SpecStore
) -> None:
    await observe_tracks(store, "helper", stable=1, canary=1)
    await api.cp.set_release(OPS, "helper", ReleaseSpec.model_validate(SPLIT))
    await observe_tracks(store, "helper", stable=0, canary=0)  # everything crashed

    aborted = await api.cp.abort(OPS, "helper")

    assert aborted.spec is not None and aborted.spec.canary_revision is None
    assert aborted.spec.stable_revision == 1 and aborted.version == 2


# ---------------------------------------------------------------- expected version


async def test_a_stale_expected_version_is_a_conflict_on_grpc_and_rest(
    api: Api, store: SpecStore
) -> None:
    await observe_tracks(store, "helper", stable=1, canary=1)
    first = await api.releases.SetRelease(_set(SPLIT, expected_version=0), metadata=OPERATOR)
    raised = {**SPLIT, "canaryWeight": 30}

    stale = await _grpc_error(
        api.releases.SetRelease(_set(raised, expected_version=0), metadata=OPERATOR)
    )
    status, body = await api.rest("PUT", "/api/v1/agents/helper/release?expectedVersion=0", raised)
    stale_promote = await _grpc_error(
        api.releases.PromoteRelease(
            pb.PromoteReleaseRequest(agent_name="helper", expected_version=7), metadata=OPERATOR
        )
    )
    abort_status, abort_body = await api.rest(
        "POST", "/api/v1/agents/helper/release/abort", {"expectedVersion": "7"}
    )
    unchanged = await store.get_release_state("helper")
    fresh = await api.releases.SetRelease(_set(raised, expected_version=1), metadata=OPERATOR)
    got = await api.releases.GetRelease(
        pb.GetReleaseRequest(agent_name="helper"), metadata=OPERATOR
    )

    assert first.release.version == 1
    assert (stale.code(), _reason(stale)) == (grpc.StatusCode.ABORTED, "conflict")
    assert "conflict on release 'helper': expected version none (create), current version is 1" in (
        stale.details() or ""
    )
    assert (status, body["error"]["code"]) == (409, "conflict")
    assert (stale_promote.code(), _reason(stale_promote)) == (grpc.StatusCode.ABORTED, "conflict")
    assert "expected version 7, current version is 1" in (stale_promote.details() or "")
    assert (abort_status, abort_body["error"]["code"]) == (409, "conflict")
    assert unchanged.version == 1 and unchanged.spec == ReleaseSpec.model_validate(SPLIT)
    assert (fresh.release.version, fresh.release.canary_weight) == (2, 30)
    assert (got.release.version, got.release.canary_weight) == (2, 30)


async def test_a_stale_expected_version_is_reported_before_an_empty_track_and_in_a_dry_run(
    api: Api, store: SpecStore
) -> None:
    await observe_tracks(store, "helper", stable=1, canary=1)
    await api.cp.set_release(OPS, "helper", ReleaseSpec.model_validate(SPLIT))
    await observe_tracks(store, "helper", stable=1, canary=0)
    spec = ReleaseSpec.model_validate({**SPLIT, "canaryWeight": 50})

    with pytest.raises(ConflictError) as dry:
        await api.cp.set_release(OPS, "helper", spec, dry_run=True, expected_version=0)
    with pytest.raises(ConflictError) as both_wrong:
        await api.cp.set_release(OPS, "helper", spec, expected_version=5)

    assert (dry.value.expected, dry.value.actual) == (0, 1)
    assert (both_wrong.value.expected, both_wrong.value.actual) == (5, 1)
    assert (await store.get_release_state("helper")).spec == ReleaseSpec.model_validate(SPLIT)


async def test_of_two_writers_with_the_same_expected_version_one_conflicts(
    api: Api, store: SpecStore
) -> None:
    await observe_tracks(store, "helper", stable=1, canary=1)
    await api.cp.set_release(OPS, "helper", ReleaseSpec.model_validate(SPLIT))
    specs = [ReleaseSpec.model_validate({**SPLIT, "canaryWeight": w}) for w in (20, 40)]

    outcomes = await asyncio.gather(
        *(api.cp.set_release(OPS, "helper", s, expected_version=1) for s in specs),
        return_exceptions=True,
    )

    conflicts = [o for o in outcomes if isinstance(o, ConflictError)]
    written = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(conflicts) == 1 and len(written) == 1
    state = await store.get_release_state("helper")
    assert state.version == 2 and state.spec == written[0].spec


# ---------------------------------------------------------------- audit


async def test_each_release_action_is_audited_as_itself_with_before_and_after(
    api: Api, store: SpecStore
) -> None:
    await observe_tracks(store, "helper", stable=1, canary=1)
    await api.releases.SetRelease(_set(SPLIT, message="10% to m2"), metadata=OPERATOR)
    await api.releases.PromoteRelease(
        pb.PromoteReleaseRequest(agent_name="helper"), metadata=OPERATOR
    )
    await api.cp.set_release(
        OPS,
        "helper",
        ReleaseSpec.model_validate({**SPLIT, "stableRevision": 2, "canaryRevision": 1}),
    )
    await api.releases.AbortRelease(pb.AbortReleaseRequest(agent_name="helper"), metadata=OPERATOR)
    await api.cp.set_release(
        OPS,
        "helper",
        ReleaseSpec.model_validate({**SPLIT, "stableRevision": 2, "canaryRevision": 1}),
    )
    figures = {"gate": "errorRate", "canary": 0.31, "stable": 0.01, "samples": 120}
    await api.cp.abort(OPS, "helper", message="gate failed", action="auto-abort", details=figures)

    listed = await api.audit.ListAuditEntries(
        pb.ListAuditEntriesRequest(kind="Release", name="helper"),
        metadata=(("authorization", f"Bearer {ROLE_TOKENS['admin']}"),),
    )
    status, rest = await rest_call(
        api.http, "GET", "/api/v1/audit?kind=Release&name=helper", ROLE_TOKENS["admin"]
    )

    entries = list(reversed(listed.entries))  # oldest first
    assert [e.action for e in entries] == [
        "release.set",
        "release.promote",
        "release.set",
        "release.abort",
        "release.set",
        "release.auto-abort",
    ]
    first, promote, auto = entries[0], entries[1], entries[5]
    assert not first.HasField("before") and from_struct(first.after)["canaryWeight"] == 10
    assert first.message == "10% to m2" and first.actor == "user-operator"
    assert from_struct(promote.before)["canaryRevision"] == 2
    after = from_struct(promote.after)
    assert (after["stableRevision"], after["canaryRevision"], after["canaryWeight"]) == (2, None, 0)
    assert from_struct(auto.before)["canaryRevision"] == 1
    assert from_struct(auto.after)["canaryRevision"] is None
    assert from_struct(auto.details) == figures and auto.message == "gate failed"
    assert not promote.HasField("details")
    assert status == 200 and rest["entries"][0]["action"] == "release.auto-abort"
    assert rest["entries"][0]["details"] == figures
    assert rest["entries"][0]["before"]["canaryWeight"] == 10


async def test_a_prompt_release_names_its_current_version_only_when_one_is_set(
    api: Api, store: SpecStore
) -> None:
    # the REST answer follows the OpenAPI schema: `current` is a version or absent, never ""
    labelled = {"labels": {"prod": "1.0.0"}, "weights": {}}
    set_status, _ = await api.rest("PUT", "/api/v1/prompts/p/release", labelled)
    status, before = await api.rest("GET", "/api/v1/prompts/p")
    await store.put_prompt_version(
        PromptEntry(prompt_key="p", version="1.1.0", template="You help more."), actor="t"
    )
    rolled, _ = await api.rest("POST", "/api/v1/prompts/p/rollback", {"version": "1.0.0"})
    _, after = await api.rest("GET", "/api/v1/prompts/p")

    assert (set_status, status, rolled) == (200, 200, 200)
    assert before["prompt"]["release"] == {"labels": {"prod": "1.0.0"}, "weights": {}}
    assert after["prompt"]["release"]["current"] == "1.0.0"
