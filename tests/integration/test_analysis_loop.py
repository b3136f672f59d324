"""The release analysis loop against a real etcd and a real trace store: it walks the steps,
aborts a bad canary by itself (audited with the figures), promotes a good one, and resumes
after a restart. Turns are spans shaped as the engine exports them; the clock is injected."""

from __future__ import annotations

import itertools
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from control_plane.analysis_loop import ANALYSIS_PRINCIPAL, CANARY_UNREADY_SECONDS, AnalysisLoop
from control_plane.api import ControlPlane
from control_plane.evaluation import EvaluationResult, check_answer
from control_plane.traces import InMemoryTraceStore, Span, SqliteTraceStore, TraceStore
from specmesh.keys import Keys
from specmesh.spec.models import AgentSpec, EvaluationSpec, ReleaseSpec
from specmesh.store import SpecStore
from specmesh.vault import VaultClient

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
_ids = itertools.count(1)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def _spec(temperature: float) -> AgentSpec:
    return AgentSpec.model_validate(
        {
            "base": {"description": "analysed", "promptKey": "p"},
            "model": {"model": "scripted", "temperature": temperature},
        }
    )


def _turn(agent: str, revision: int, at: datetime, *, error: bool, seconds: float = 0.2) -> Span:
    start = int(at.timestamp() * 1e9)
    trace_id = f"{next(_ids):032x}"
    return Span(
        trace_id=trace_id,
        span_id=f"{next(_ids):016x}",
        parent_span_id=None,
        name=f"invoke_agent {agent}",
        kind="INTERNAL",
        start_ns=start,
        end_ns=start + int(seconds * 1e9),
        status="ERROR" if error else "UNSET",
        agent=agent,
        attributes={"gen_ai.operation.name": "invoke_agent", "specmesh.spec.revision": revision},
    )


@pytest.fixture(params=["memory", "sqlite"])
async def traces(request: pytest.FixtureRequest) -> AsyncIterator[TraceStore]:
    if request.param == "memory":
        yield InMemoryTraceStore()
        return
    async with SqliteTraceStore(path=":memory:") as store:
        yield store


async def _traffic(
    traces: TraceStore,
    agent: str,
    at: datetime,
    *,
    stable: int,
    canary: int,
    canary_errors: float,
    n: int,
    weight: int,
    rng: random.Random,
) -> None:
    spans = []
    for i in range(n):
        moment = at + timedelta(milliseconds=10 * i)
        if rng.random() < weight / 100:
            spans.append(_turn(agent, canary, moment, error=rng.random() < canary_errors))
        else:
            spans.append(_turn(agent, stable, moment, error=False))
    await traces.add_spans(spans)


ANALYSIS = {
    "steps": [{"weight": 10, "durationSeconds": 60}, {"weight": 50, "durationSeconds": 60}],
    "gates": {"maxErrorRateIncrease": 0.05},
    "minSamplePerTrack": 20,
}


async def _setup(store: SpecStore, vault: VaultClient) -> tuple[ControlPlane, str]:
    agent = "support"
    await store.apply_agent(agent, _spec(0.1), actor="t")
    await store.apply_agent(agent, _spec(0.2), actor="t")
    cp = ControlPlane(store=store, vault=vault)
    release = ReleaseSpec.model_validate(
        {"stableRevision": 1, "canaryRevision": 2, "analysis": ANALYSIS}
    )
    await store.put_release(agent, release, actor="alice")
    return cp, agent


async def test_a_canary_failing_thirty_percent_is_aborted_at_the_first_step(
    store: SpecStore, vault: VaultClient, traces: TraceStore
) -> None:
    cp, agent = await _setup(store, vault)
    clock, rng = Clock(), random.Random(7)
    loop = AnalysisLoop(control_plane=cp, turns=traces, clock=clock)

    state = await loop.analyse(agent)
    assert state is not None and state["phase"] == "running"
    assert (await store.get_release(agent)).canary_weight == 10  # type: ignore[union-attr]

    await _traffic(
        traces, agent, T0, stable=1, canary=2, canary_errors=0.3, n=400, weight=10, rng=rng
    )
    clock.now = T0 + timedelta(seconds=30)
    assert (await loop.analyse(agent))["phase"] == "running"  # type: ignore[index]
    clock.now = T0 + timedelta(seconds=61)
    state = await loop.analyse(agent)

    assert state is not None and state["phase"] == "aborted"
    release = await store.get_release(agent)
    assert release is not None
    assert (release.canary_revision, release.canary_weight, release.stable_revision) == (
        None,
        0,
        1,
    )
    assert [e["weight"] for e in state["timeline"]] == [10]  # never reached 50 %
    assert state["timeline"][0]["decision"] == "fail"
    audit = await store.audit_entries(name=agent, kind="Release")
    aborted = [e for e in audit if e.action == "release.auto-abort"]
    assert len(aborted) == 1 and aborted[0].actor == "specmesh-analysis"
    details = aborted[0].details
    assert details is not None and details["weight"] == 10
    gate = details["gates"][0]
    assert gate["gate"] == "errorRate" and gate["failed"] is True
    assert details["canary"]["errors"] > 0 and details["stable"]["errors"] == 0


async def test_a_healthy_canary_is_promoted_by_itself_and_survives_a_restart(
    store: SpecStore, vault: VaultClient
) -> None:
    cp, agent = await _setup(store, vault)
    traces, clock, rng = InMemoryTraceStore(), Clock(), random.Random(11)
    await AnalysisLoop(control_plane=cp, turns=traces, clock=clock).analyse(agent)
    await _traffic(
        traces, agent, T0, stable=1, canary=2, canary_errors=0.0, n=400, weight=10, rng=rng
    )
    clock.now = T0 + timedelta(seconds=61)
    # a restarted control plane: a new loop reads the progress from etcd
    state = await AnalysisLoop(control_plane=cp, turns=traces, clock=clock).analyse(agent)
    assert state is not None and (state["phase"], state["step"]) == ("running", 1)
    assert (await store.get_release(agent)).canary_weight == 50  # type: ignore[union-attr]

    step2 = T0 + timedelta(seconds=62)
    await _traffic(
        traces, agent, step2, stable=1, canary=2, canary_errors=0.0, n=200, weight=50, rng=rng
    )
    clock.now = T0 + timedelta(seconds=125)
    state = await AnalysisLoop(control_plane=cp, turns=traces, clock=clock).analyse(agent)

    assert state is not None and state["phase"] == "promoted"
    assert [(e["weight"], e["decision"]) for e in state["timeline"]] == [
        (10, "pass"),
        (50, "pass"),
    ]
    release = await store.get_release(agent)
    assert release is not None
    assert (release.stable_revision, release.canary_revision) == (2, None)
    actions = [e.action for e in await store.audit_entries(name=agent, kind="Release")]
    assert actions[0] == "release.promote"
    # alice's set (the policy with its analysis), then the loop's 10 % and 50 %
    assert actions.count("release.set") == 3


async def test_without_enough_canary_turns_the_step_holds_and_never_aborts(
    store: SpecStore, vault: VaultClient
) -> None:
    cp, agent = await _setup(store, vault)
    traces, clock = InMemoryTraceStore(), Clock()
    loop = AnalysisLoop(control_plane=cp, turns=traces, clock=clock)
    await loop.analyse(agent)
    # every canary turn fails, but there are only 5 of them
    await traces.add_spans(
        [_turn(agent, 2, T0 + timedelta(seconds=i), error=True) for i in range(5)]
        + [_turn(agent, 1, T0 + timedelta(seconds=i), error=False) for i in range(50)]
    )
    clock.now = T0 + timedelta(hours=1)
    state = await loop.analyse(agent)

    assert state is not None and state["phase"] == "running"
    assert "not enough data" in state["timeline"][0]["reason"]
    assert (await store.get_release(agent)).canary_revision == 2  # type: ignore[union-attr]


async def test_the_first_step_waits_for_a_ready_canary_instance(
    store: SpecStore, vault: VaultClient
) -> None:
    cp, agent = await _setup(store, vault)
    loop = AnalysisLoop(control_plane=cp, turns=InMemoryTraceStore(), clock=Clock())
    tracks = {"stable": {"desired": 1, "ready": 1}, "canary": {"desired": 1, "ready": 0}}
    await store.put_status(agent, {"tracks": tracks})

    assert await loop.analyse(agent) is None
    assert (await store.get_release(agent)).canary_weight == 0  # type: ignore[union-attr]

    tracks["canary"]["ready"] = 1
    await store.put_status(agent, {"tracks": tracks})
    state = await loop.analyse(agent)
    assert state is not None and state["phase"] == "running"
    assert (await store.get_release(agent)).canary_weight == 10  # type: ignore[union-attr]


async def test_a_release_ended_by_hand_cancels_its_analysis(
    store: SpecStore, vault: VaultClient
) -> None:
    cp, agent = await _setup(store, vault)
    loop = AnalysisLoop(control_plane=cp, turns=InMemoryTraceStore(), clock=Clock())
    await loop.analyse(agent)

    await cp.abort(ANALYSIS_PRINCIPAL, agent, message="by hand")
    state = await loop.analyse(agent)

    assert state is not None and state["phase"] == "cancelled"
    assert state["timeline"][-1]["reason"] == "the release changed outside the analysis"
    assert (await store.get_analysis(agent)) == state


async def test_an_abort_the_loop_did_not_record_before_a_restart_is_labelled_aborted(
    store: SpecStore, vault: VaultClient
) -> None:
    cp, agent = await _setup(store, vault)
    await AnalysisLoop(control_plane=cp, turns=InMemoryTraceStore(), clock=Clock()).analyse(agent)
    # the loop aborted the release, then its control plane died before writing the analysis
    await cp.abort(ANALYSIS_PRINCIPAL, agent, message="error rate", action="auto-abort")

    restarted = AnalysisLoop(control_plane=cp, turns=InMemoryTraceStore(), clock=Clock())
    state = await restarted.analyse(agent)

    assert state is not None and state["phase"] == "aborted"
    assert state["timeline"][-1]["reason"] == "error rate"


async def test_a_canary_with_no_ready_instance_fails_its_step_after_a_while(
    store: SpecStore, vault: VaultClient
) -> None:
    cp, agent = await _setup(store, vault)
    clock = Clock()
    loop = AnalysisLoop(control_plane=cp, turns=InMemoryTraceStore(), clock=clock)
    tracks = {"stable": {"desired": 1, "ready": 1}, "canary": {"desired": 1, "ready": 1}}
    await store.put_status(agent, {"tracks": tracks})
    await loop.analyse(agent)
    # the canary dies: the router sends it nothing, so no count could ever fail it
    tracks["canary"]["ready"] = 0
    await store.put_status(agent, {"tracks": tracks})
    clock.now = T0 + timedelta(seconds=10)
    held = await loop.analyse(agent)
    clock.now = T0 + timedelta(seconds=10 + CANARY_UNREADY_SECONDS)
    state = await loop.analyse(agent)

    assert held is not None and held["phase"] == "running"
    assert state is not None and state["phase"] == "aborted"
    assert state["timeline"][0]["reason"] == (
        f"the canary track has had no ready instance for {CANARY_UNREADY_SECONDS:.0f} s"
    )
    entry = (await store.audit_entries(name=agent, kind="Release", limit=1))[0]
    assert entry.action == "release.auto-abort"


async def test_a_hold_with_nothing_new_writes_nothing(
    store: SpecStore, vault: VaultClient, keys: Keys
) -> None:
    cp, agent = await _setup(store, vault)
    clock = Clock()
    loop = AnalysisLoop(control_plane=cp, turns=InMemoryTraceStore(), clock=clock)
    await loop.analyse(agent)
    clock.now = T0 + timedelta(seconds=65)  # past the step's 60 s
    await loop.analyse(agent)  # the first judgement: "not enough data" is recorded
    written = await store.etcd.get(keys.agent_analysis(agent))
    clock.now = T0 + timedelta(seconds=70)
    state = await loop.analyse(agent)
    again = await store.etcd.get(keys.agent_analysis(agent))

    assert state is not None and state["phase"] == "running"
    assert "not enough data" in state["timeline"][0]["reason"]
    assert written is not None and again is not None
    assert again.mod_revision == written.mod_revision


class ScriptedEvaluator:
    """Answers each run with the next of ``answers`` (the answer every case gets), through
    the real case checks."""

    def __init__(self, *answers: str) -> None:
        self.answers = list(answers)
        self.runs = 0

    async def run(self, agent: str, spec: EvaluationSpec) -> EvaluationResult:
        answer = self.answers[self.runs]
        self.runs += 1
        return EvaluationResult(
            cases=[check_answer(c, answer, name=f"case {i}") for i, c in enumerate(spec.cases)],
            max_failures=spec.max_failures,
        )


EVALUATED = {
    **ANALYSIS,
    "evaluation": {
        "cases": [
            {"prompt": "2+2?", "contains": ["4"]},
            {"prompt": "refund?", "notContains": ["sorry"]},
        ]
    },
}


async def _evaluated(store: SpecStore, vault: VaultClient) -> tuple[ControlPlane, str]:
    cp, agent = await _setup(store, vault)
    release = ReleaseSpec.model_validate(
        {"stableRevision": 1, "canaryRevision": 2, "analysis": EVALUATED}
    )
    await store.put_release(agent, release, actor="alice")
    return cp, agent


async def test_a_failed_evaluation_aborts_before_the_first_weight(
    store: SpecStore, vault: VaultClient
) -> None:
    cp, agent = await _evaluated(store, vault)
    evaluator = ScriptedEvaluator("sorry, 5")
    loop = AnalysisLoop(
        control_plane=cp, turns=InMemoryTraceStore(), clock=Clock(), evaluator=evaluator
    )

    state = await loop.analyse(agent)

    assert state is not None and state["phase"] == "aborted"
    [entry] = state["timeline"]
    assert (entry["step"], entry["weight"], entry["decision"]) == (0, 10, "fail")
    assert entry["reason"] == "evaluation: 2 of 2 cases failed (at most 0 may)"
    assert [(c["failed"], c["excerpt"]) for c in entry["evaluation"]["cases"]] == [
        ("contains '4'", "sorry, 5"),
        ("notContains 'sorry'", "sorry, 5"),
    ]
    release = await store.get_release(agent)
    assert release is not None and (release.canary_revision, release.canary_weight) == (None, 0)
    audit = await store.audit_entries(name=agent, kind="Release")
    actions = [e.action for e in audit]
    assert "release.auto-abort" in actions
    assert not any(e.action == "release.set" and e.actor == ANALYSIS_PRINCIPAL.name for e in audit)
    [aborted] = [e for e in audit if e.action == "release.auto-abort"]
    assert aborted.details is not None and aborted.details["evaluation"]["failures"] == 2
    assert await loop.analyse(agent) == state  # nothing more: the canary is gone
    assert evaluator.runs == 1


async def test_evaluation_runs_before_each_step_and_a_later_failure_stops_at_that_step(
    store: SpecStore, vault: VaultClient
) -> None:
    cp, agent = await _evaluated(store, vault)
    clock, traces, rng = Clock(), InMemoryTraceStore(), random.Random(3)
    loop = AnalysisLoop(
        control_plane=cp, turns=traces, clock=clock, evaluator=ScriptedEvaluator("4", "five")
    )

    state = await loop.analyse(agent)
    assert state is not None and state["phase"] == "running"
    assert state["timeline"][0]["evaluation"]["passed"] is True
    assert (await store.get_release(agent)).canary_weight == 10  # type: ignore[union-attr]

    await _traffic(
        traces, agent, T0, stable=1, canary=2, canary_errors=0, n=400, weight=10, rng=rng
    )
    clock.now = T0 + timedelta(seconds=61)
    state = await loop.analyse(agent)

    assert state is not None and state["phase"] == "aborted"
    assert [(e["weight"], e["decision"]) for e in state["timeline"]] == [(10, "pass"), (50, "fail")]
    assert state["timeline"][1]["evaluation"]["cases"][0]["failed"] == "contains '4'"
    release = await store.get_release(agent)
    assert release is not None and (release.canary_revision, release.canary_weight) == (None, 0)
    weights = [
        e.after.get("canaryWeight")
        for e in await store.audit_entries(name=agent, kind="Release")
        if e.action == "release.set" and isinstance(e.after, dict)
    ]
    assert 10 in weights and 50 not in weights
