"""The sidecar's one policy: its error table rendered the same over HTTP and gRPC (and as
A2A errors), and its decisions -- declared or not, retries, budgets -- taken once for both."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NoReturn

import grpc
import pytest
from a2a.utils.errors import JSON_RPC_ERROR_CODE_MAP, A2AError
from google.rpc import error_details_pb2, status_pb2

from sidecar.affinity import ConversationTracks
from sidecar.callers import CallerRefused
from sidecar.errors import ERROR_DOMAIN, POLICY_ERRORS, PolicyError
from sidecar.grpcproxy import abort_policy
from sidecar.ledger import BudgetLedger, LedgerEntry, UsageTap
from sidecar.policy import EgressPolicy, Retries
from sidecar.router import InMemoryInstanceSource, InMemoryReleaseSource, Instance, Router
from specmesh.budget import LEDGER_HEADER
from specmesh.prices import PriceMap
from specmesh.snapshot import PromptBundle, ResolvedSnapshot
from specmesh.spec.models import AgentSpec, ConnectionPoolSpec, ReleaseSpec


class _Aborted(Exception):
    pass


class _Context:
    """What :func:`abort_policy` uses of a ``grpc.aio.ServicerContext``: ``abort``."""

    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str, Any] | None = None

    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata: Any) -> NoReturn:
        self.aborted = (code, details, trailing_metadata)
        raise _Aborted


def _error_info(status: status_pb2.Status) -> error_details_pb2.ErrorInfo:
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info


@pytest.mark.parametrize("reason", sorted(POLICY_ERRORS))
async def test_every_table_row_renders_alike_on_http_grpc_and_a2a(reason: str) -> None:
    row = POLICY_ERRORS[reason]
    error = PolicyError(reason, f"what is wrong with {reason}", target="t-1")

    # HTTP adapter: the status and AIP-193 body every HTTP listener answers
    response = error.http_response()
    body = json.loads(response.body)  # type: ignore[arg-type]
    assert response.status == row.http_status
    assert body["error"]["code"] == row.http_status
    assert body["error"]["status"] == row.grpc_code.name
    assert body["error"]["message"] == f"what is wrong with {reason}"
    assert body["error"]["details"][0]["reason"] == reason
    assert body["error"]["details"][0]["metadata"] == {"target": "t-1"}

    # gRPC adapter: the status, message and google.rpc.Status every gRPC listener answers
    context = _Context()
    with pytest.raises(_Aborted):
        await abort_policy(context, error)  # type: ignore[arg-type]
    assert context.aborted is not None
    code, details, trailers = context.aborted
    assert code == row.grpc_code
    assert details == f"what is wrong with {reason}"
    ((key, value),) = trailers
    status = status_pb2.Status.FromString(value)
    assert key == "grpc-status-details-bin"
    assert status.code == row.grpc_code.value[0]
    info = _error_info(status)
    assert (info.reason, info.domain, dict(info.metadata)) == (
        reason,
        ERROR_DOMAIN,
        {"target": "t-1"},
    )

    # A2A: the a2a-sdk error of the row, with its JSON-RPC code
    a2a = error.to_a2a()
    assert isinstance(a2a, A2AError) and type(a2a) is row.a2a_error
    assert row.a2a_code == JSON_RPC_ERROR_CODE_MAP[row.a2a_error]
    assert a2a.message == error.message and a2a.data == {"reason": reason, "target": "t-1"}


def test_an_unknown_reason_is_refused() -> None:
    with pytest.raises(ValueError, match="NO_SUCH"):
        PolicyError("NO_SUCH", "x")


def test_caller_refusals_come_from_the_same_table() -> None:
    for reason in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        refused = CallerRefused(reason, "no", agent="agent-b")  # type: ignore[arg-type]
        assert (refused.http_status, refused.grpc_code) == (
            POLICY_ERRORS[reason].http_status,
            POLICY_ERRORS[reason].grpc_code,
        )
        assert _error_info(refused.rpc_status()).metadata["agent"] == "agent-b"


# ---------------------------------------------------------------- decisions


class _NoSecrets:
    async def resolve(self, value: str) -> str:
        return value


def _snapshot(**spec: Any) -> ResolvedSnapshot:
    return ResolvedSnapshot(
        agent_name="agent-a",
        revision=1,
        track="stable",
        spec=AgentSpec.model_validate(
            {"base": {"description": "d", "promptKey": "p"}, "model": {"model": "m"}, **spec}
        ),
        prompt=PromptBundle(),
        mcp_servers={},
    )


def test_declared_partner_is_found_by_resource_name() -> None:
    policy = EgressPolicy(credentials=_NoSecrets())  # type: ignore[arg-type]
    snapshot = _snapshot(partnerAgents=[{"agentName": "Agent_B"}])
    agent, partner = policy.partner(snapshot, "agent-b")
    assert (agent, partner.agent_name) == ("agent-b", "Agent_B")


@pytest.mark.parametrize(
    ("wanted", "reason", "named"),
    [
        ("agent-c", "NOT_DECLARED", "is not declared in agent 'agent-a'"),
        ("Bad Name!", "INVALID_TARGET", "is not a valid name"),
        ("", "INVALID_TARGET", "is empty"),
    ],
)
def test_undeclared_or_malformed_target_is_refused_naming_it(
    wanted: str, reason: str, named: str
) -> None:
    policy = EgressPolicy(credentials=_NoSecrets())  # type: ignore[arg-type]
    snapshot = _snapshot(partnerAgents=[{"agentName": "agent-b"}])
    for _ in range(2):  # the second answer comes from the per-snapshot decisions
        with pytest.raises(PolicyError) as info:
            policy.partner(snapshot, wanted)
        assert info.value.reason == reason
        assert named in info.value.message and repr(wanted) in info.value.message
    with pytest.raises(PolicyError) as mcp:
        policy.mcp_server(snapshot, wanted)
    assert mcp.value.reason == reason


def test_a_new_snapshot_brings_new_decisions() -> None:
    policy = EgressPolicy(credentials=_NoSecrets())  # type: ignore[arg-type]
    with pytest.raises(PolicyError):
        policy.partner(_snapshot(), "agent-b")
    agent, _ = policy.partner(_snapshot(partnerAgents=[{"agentName": "agent-b"}]), "agent-b")
    assert agent == "agent-b"


def _ledger_headers(entry: LedgerEntry) -> dict[str, str]:
    return {LEDGER_HEADER: entry.id}


def test_a_partner_call_with_nothing_left_in_its_ledger_entry_is_refused_naming_it() -> None:
    ledger = BudgetLedger()
    policy = EgressPolicy(credentials=_NoSecrets(), ledger=ledger)  # type: ignore[arg-type]
    assert policy.partner_budget("agent-b", {}) is None  # no budget anywhere: no check
    entry = ledger.open(0.05)
    entry.charge(0.04)
    assert policy.partner_budget("agent-b", _ledger_headers(entry)) is entry

    entry.charge(0.01)
    with pytest.raises(PolicyError) as info:
        policy.partner_budget("agent-b", _ledger_headers(entry))

    assert info.value.reason == "BUDGET_EXCEEDED" and info.value.http_status == 402
    assert "budget is $0.05, $0 is left" in info.value.message
    assert "'agent-b'" in info.value.message
    assert info.value.fields["budgetUsd"] == "0.05"


def _priced(
    input_per_million: float, output_per_million: float
) -> tuple[BudgetLedger, EgressPolicy, ResolvedSnapshot]:
    """A ledger, a policy over it (litellm's map empty), and a snapshot whose model "m" has
    these prices and whose one fallback is priced nowhere."""
    ledger = BudgetLedger()
    policy = EgressPolicy(
        credentials=_NoSecrets(),  # type: ignore[arg-type]
        prices=PriceMap(path=Path("/nonexistent")),
        ledger=ledger,
    )
    price = {"inputPerMillion": input_per_million, "outputPerMillion": output_per_million}
    model = {"model": "m", "price": price, "fallbacks": [{"model": "unpriced"}]}
    return ledger, policy, _snapshot(model=model)


async def test_a_model_call_whose_worst_case_passes_what_is_left_is_refused() -> None:
    ledger, policy, snapshot = _priced(1_000_000, 1_000_000)
    body = json.dumps({"model": "m", "max_tokens": 10}).encode()  # 29 bytes: 8 tokens in
    worst = 8 * 1.0 + 10 * 1.0
    entry = ledger.open(100.0)
    entry.charge(100.0 - worst)
    headers = _ledger_headers(entry)

    assert await policy.model_budget(snapshot, None, body, headers) is entry  # exactly: allowed
    entry.charge(0.1)
    with pytest.raises(PolicyError) as info:
        await policy.model_budget(snapshot, None, body, headers)
    # a fallback priced nowhere has no worst case: only "nothing left" refuses it
    await policy.model_budget(snapshot, 0, body, headers)
    entry.charge(100.0)
    with pytest.raises(PolicyError):
        await policy.model_budget(snapshot, 0, body, headers)

    assert info.value.reason == "BUDGET_EXCEEDED"
    assert info.value.message == (
        "budget exceeded: a call to model 'm' is refused: the request's budget is $100, "
        "$17.9 is left, and this call may cost up to $18"
    )


async def test_a_model_call_is_charged_from_its_answers_usage_else_its_worst_case() -> None:
    ledger, policy, snapshot = _priced(1.0, 2.0)
    body = json.dumps({"model": "m", "max_tokens": 1000}).encode()  # 34 bytes: 9 tokens in
    entry = ledger.open(None)
    answer = UsageTap("application/json")
    answer.feed(b'{"choices": [], "usage": {"prompt_tokens": 100, ')
    answer.feed(b'"completion_tokens": 50, "total_tokens": 150}}')
    silent = UsageTap("application/json")
    silent.feed(b'{"choices": []}')

    await policy.charge_model(entry, snapshot, None, body, answer)
    after_usage = entry.spent_usd
    await policy.charge_model(entry, snapshot, None, body, silent)
    await policy.charge_model(entry, snapshot, 0, body, answer)  # unpriced: flagged only

    assert after_usage == pytest.approx((100 * 1.0 + 50 * 2.0) / 1e6)
    assert entry.spent_usd - after_usage == pytest.approx((9 * 1.0 + 1000 * 2.0) / 1e6)
    assert entry.unpriced == {"unpriced"}


def test_a_call_naming_no_open_entry_is_refused_while_a_budget_applies() -> None:
    ledger = BudgetLedger()
    policy = EgressPolicy(credentials=_NoSecrets(), ledger=ledger)  # type: ignore[arg-type]
    unbudgeted = ledger.open(None)
    assert policy.partner_budget("agent-b", {}) is None  # nothing budgeted is open

    ledger.open(1.0)
    refusals = []
    for headers in ({}, {LEDGER_HEADER: "made-up"}):
        with pytest.raises(PolicyError) as info:
            policy.partner_budget("agent-b", headers)
        refusals.append(info.value)

    assert policy.partner_budget("agent-b", _ledger_headers(unbudgeted)) is unbudgeted
    assert [e.reason for e in refusals] == ["BUDGET_EXCEEDED"] * 2
    assert "names no cost ledger entry" in refusals[0].message
    assert "names an unknown ledger entry" in refusals[1].message


def test_calls_in_flight_past_the_pool_overflow() -> None:
    policy = EgressPolicy(credentials=_NoSecrets())  # type: ignore[arg-type]
    pool = ConnectionPoolSpec(maxConnections=1, maxPendingRequests=1)
    policy.enter("agent-b", pool)
    policy.enter("agent-b", pool)
    with pytest.raises(PolicyError) as info:
        policy.enter("agent-b", pool)
    assert info.value.reason == "OVERFLOW" and "agent-b" in info.value.message
    policy.leave("agent-b")
    policy.enter("agent-b", pool)


def _router(*ids: str, release: ReleaseSpec | None = None) -> Router:
    instances = InMemoryInstanceSource(
        Instance(i, "agent-b", f"http://127.0.0.1:{n + 1}") for n, i in enumerate(ids)
    )
    releases = InMemoryReleaseSource({"agent-b": release} if release else {})
    return Router(instances=instances, releases=releases)


def test_connect_failure_is_retried_on_another_instance_within_attempts() -> None:
    retried: list[str] = []
    retries = Retries(_router("b-1", "b-2", "b-3"), "agent-b", on_retry=retried.append)
    first = retries.pick({})
    assert retries.failed(first, "connect")
    second = retries.pick({})
    assert second.instance != first.instance
    assert retries.failed(second, "connect")
    third = retries.pick({})
    assert not retries.failed(third, "connect")  # default attempts: 2
    assert retried == ["agent-b", "agent-b"]
    assert {first.instance, second.instance, third.instance} == {"b-1", "b-2", "b-3"}


def test_retry_on_follows_the_targets_release() -> None:
    release = ReleaseSpec.model_validate({"retries": {"attempts": 3, "retryOn": "reset"}})
    retries = Retries(_router("b-1", release=release), "agent-b")
    target = retries.pick({})
    assert not retries.failed(target, "connect")  # not in retryOn
    assert retries.failed(target, "reset")
    assert not retries.answered(target, 503)  # gateway-error not in retryOn
    assert retries.answered(target, 200) is False


def test_no_instance_is_the_tables_no_instance() -> None:
    retries = Retries(_router(), "agent-b")
    with pytest.raises(PolicyError) as info:
        retries.pick({})
    assert info.value.reason == "NO_INSTANCE" and info.value.http_status == 503


def _two_track_router(releases: InMemoryReleaseSource) -> Router:
    instances = InMemoryInstanceSource(
        Instance(f"{agent}-{track}", agent, f"http://127.0.0.1:{n + 1}", track)
        for n, (agent, track) in enumerate(
            (a, t) for a in ("agent-b", "agent-c") for t in ("stable", "canary")
        )
    )
    return Router(instances=instances, releases=releases)


def test_a_partner_conversation_keeps_its_track_per_partner() -> None:
    canary_2 = ReleaseSpec.model_validate(
        {
            "canaryRevision": 2,
            "canaryWeight": 100,
            "headerMatch": [{"name": "x-canary", "exact": "yes"}],
        }
    )
    releases = InMemoryReleaseSource({"agent-b": canary_2, "agent-c": canary_2})
    router = _two_track_router(releases)
    tracks = ConversationTracks(max_age=60, max_entries=10)

    def track(agent: str, context_id: str | None, headers: dict[str, str] | None = None) -> str:
        retries = Retries(router, agent, tracks=tracks, context_id=context_id)
        target = retries.pick(headers or {})
        assert target.track is not None
        return target.track

    assert track("agent-b", "conv-1") == "canary"  # pinned by its first call
    releases.set("agent-b", canary_2.model_copy(update={"canary_weight": 0}))
    releases.set("agent-c", canary_2.model_copy(update={"canary_weight": 0}))

    assert track("agent-b", "conv-1") == "canary"  # the pin holds against the weight
    assert track("agent-c", "conv-1") == "stable"  # another partner: another conversation
    assert track("agent-b", "conv-2") == "stable"  # a new one follows the weight
    assert track("agent-b", None) == "stable"  # no contextId: nothing pinned
    assert track("agent-b", "conv-2", {"x-canary": "yes"}) == "canary"  # headerMatch wins
    assert track("agent-b", "conv-2") == "stable"

    releases.set("agent-b", canary_2.model_copy(update={"canary_revision": 3, "canary_weight": 0}))
    assert track("agent-b", "conv-1") == "stable"  # another canary: split by the release


def test_without_tracks_every_call_is_split() -> None:
    releases = InMemoryReleaseSource(
        {"agent-b": ReleaseSpec.model_validate({"canaryRevision": 2, "canaryWeight": 100})}
    )
    router = _two_track_router(releases)
    assert Retries(router, "agent-b", context_id="conv-1").pick({}).track == "canary"
    releases.set("agent-b", ReleaseSpec.model_validate({"canaryRevision": 2}))
    assert Retries(router, "agent-b", context_id="conv-1").pick({}).track == "stable"
