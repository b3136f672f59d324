"""The analysis loop: walks each analysed release through its steps, by itself.

For every agent whose release policy carries ``analysis`` and names a canary revision,
every ``interval_seconds``:

1. a new canary (no progress recorded for it, or the recorded analysis ended) starts at
   step 0 once its track has a ready instance (the controller's observed state; a weight
   to an empty track would fail calls under Istio): the release's ``canaryWeight`` is set
   to the step's weight (``release.set``);
2. the turns each track answered since the step began are read -- never from an engine's
   own report: requests, failed turns and the latency histogram from what the sidecars
   counted of the calls they relayed to their engines (``requests``:
   :class:`~control_plane.sidecar_metrics.SidecarScraper` reads every instance's
   ``/metrics``; the counts at the step's start live in the state, ``window``), and the cost
   per turn from the trace store (the engines' ``invoke_agent`` spans of stable's or the
   canary's ``specmesh.spec.revision`` and the priced model calls inside them). Without
   ``requests`` (no sidecar runs: embedding, tests) everything is read from the spans;
3. :func:`control_plane.analysis.judge` decides: ``hold`` keeps the step (its figures are
   recorded), ``pass`` moves to the next step (its weight is set) or, after the last,
   promotes the canary (``release.promote``); ``fail`` aborts the release
   (:meth:`ControlPlane.abort` with ``action="auto-abort"`` and the figures as
   ``details``): canary weight 0, stable untouched.

The progress (phase: ``running``, ``aborted``, ``promoted``, or ``cancelled`` when the
release changed outside the analysis -- promoted, aborted or replaced by hand; the current
step, when it began, a timeline of the steps with their figures and decisions) lives in etcd
at ``<prefix>/analysis/<agent>``, so a restarted control plane resumes where it was; the loop
holds nothing else. The clock is injected.
Run one loop per store (one control-plane replica), like the controller.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from control_plane.analysis import StepDecision, TrackWindow, judge
from control_plane.api import ControlPlane
from control_plane.auth import Principal, Role
from control_plane.evaluation import EvaluationResult, Evaluator, not_run
from control_plane.sidecar_metrics import InstanceScrape, RequestSource, Window
from control_plane.traces import Turn
from specmesh.names import resource_name
from specmesh.spec.models import ReleaseSpec

__all__ = ["ANALYSIS_PRINCIPAL", "AnalysisLoop", "TurnSource", "windows"]

logger = logging.getLogger(__name__)

CANARY_UNREADY_SECONDS = 60.0
"""A canary track seen with no ready instance this long (or the step's duration, if longer)
fails its step: a dead canary gets no traffic, so no count would ever fail it."""

ANALYSIS_PRINCIPAL = Principal(name="specmesh-analysis", roles=frozenset({Role.OPERATOR}))
"""Who the loop's release changes are audited as."""


class TurnSource(Protocol):
    """Where the turns come from (:class:`control_plane.traces.TraceStore`)."""

    async def turns(
        self, *, agents: Sequence[str], since: datetime, until: datetime
    ) -> list[Turn]: ...


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds")


def windows(
    turns: Sequence[Turn], *, stable: int, canary: int, counted: Window | None = None
) -> tuple[TrackWindow, TrackWindow]:
    """Per-track windows: cost per turn from ``turns`` (the trace store; turns of other
    revisions are left out); requests, errors and latencies from the sidecars' ``counted``
    window -- or, without one, from ``turns`` too (the engines' spans)."""
    totals = counted.totals() if counted is not None else None

    def window(revision: int) -> TrackWindow:
        mine = [t for t in turns if t.revision == revision]
        costs = [t.cost_usd for t in mine]
        if totals is None:
            return TrackWindow(
                requests=len(mine),
                errors=sum(t.error for t in mine),
                latencies=[t.seconds for t in mine],
                costs=costs,
            )
        seen = totals.get(revision)
        if seen is None:
            return TrackWindow(costs=costs)
        return TrackWindow(
            requests=seen.requests,
            errors=seen.errors,
            histogram=seen.histogram() if seen.buckets else None,
            costs=costs,
        )

    return window(stable), window(canary)


class AnalysisLoop:
    """See the module docstring."""

    def __init__(
        self,
        *,
        control_plane: ControlPlane,
        turns: TurnSource,
        requests: RequestSource | None = None,
        interval_seconds: float = 5.0,
        clock: Callable[[], datetime] = _utcnow,
        principal: Principal = ANALYSIS_PRINCIPAL,
        evaluator: Evaluator | None = None,
    ) -> None:
        self.cp = control_plane
        self.store = control_plane.store
        self.turns = turns
        self.requests = requests
        self.interval_seconds = interval_seconds
        self.clock = clock
        self.principal = principal
        self.evaluator = evaluator
        """Runs a release's ``evaluation`` before each step (:mod:`control_plane.evaluation`)."""

    async def run(self) -> None:
        """Analyse every interval until cancelled."""
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("release analysis failed (will retry)")
            await asyncio.sleep(self.interval_seconds)

    async def tick(self) -> None:
        """One look at every agent's release."""
        for summary in await self.store.list_agents():
            try:
                await self.analyse(summary.name)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("release analysis of %s failed (will retry)", summary.name)

    async def analyse(self, agent: str) -> dict[str, Any] | None:
        """Advance ``agent``'s release analysis by what the data say now; its progress."""
        # every release write below is guarded by the version read here: a change made by
        # hand in between is a conflict (retried next tick, when it cancels the analysis)
        read = await self.store.get_release_state(agent)
        release, version = read.spec, read.version
        state = await self.store.get_analysis(agent)
        now = self.clock()
        if (
            state is not None
            and state.get("phase") == "running"
            and (
                release is None
                or release.analysis is None
                or release.canary_revision != state.get("canaryRevision")
            )
        ):
            # promoted, aborted or replaced by hand, or its analysis removed -- or ended by
            # this loop, which stopped before it could record it (the audit log says so)
            phase, reason = await self._ended_how(agent)
            state.update(phase=phase, updatedAt=_iso(now))
            state["timeline"][-1].update(reason=reason, updatedAt=_iso(now))
            await self.store.put_analysis(agent, state)
        if release is None or release.analysis is None or release.canary_revision is None:
            return state
        canary = release.canary_revision
        stable = release.stable_revision or await self.store.current_revision(agent)
        if (
            state is None
            or state.get("canaryRevision") != canary
            or state.get("phase") != "running"
        ):
            if not await self._canary_ready(agent):
                return state
            evaluation = await self._evaluate(agent, release)
            if evaluation is not None and not evaluation.passed:
                return await self._evaluation_failed(agent, release, version, 0, evaluation, None)
            return await self._start(
                agent, release, version, stable=stable, now=self.clock(), evaluation=evaluation
            )
        step_index = int(state["step"])
        step = release.analysis.steps[min(step_index, len(release.analysis.steps) - 1)]
        started = datetime.fromisoformat(state["stepStartedAt"])
        loaded = copy.deepcopy(state)
        unready = await self._unready_for(agent, state, now)
        if stable == canary:
            decision = StepDecision("hold", f"stable and canary are both revision {canary}")
        elif unready is not None and unready >= max(
            step.duration_seconds or 0.0, CANARY_UNREADY_SECONDS
        ):
            # a canary that died answers nothing: no traffic reaches it to count as failed
            decision = StepDecision(
                "fail", f"the canary track has had no ready instance for {unready:.0f} s"
            )
        else:
            counted: Window | None = None
            if self.requests is not None:
                scrapes = await self.requests.scrape(agent)
                counted = Window.from_json(state.get("window"))
                counted.update(scrapes, step_started=started)
                state["window"] = counted.to_json()
            turns = await self.turns.turns(
                agents=list(dict.fromkeys([agent, resource_name(agent)])), since=started, until=now
            )
            stable_window, canary_window = windows(
                turns, stable=stable, canary=canary, counted=counted
            )
            decision = judge(
                release.analysis,
                step,
                held_seconds=(now - started).total_seconds(),
                stable=stable_window,
                canary=canary_window,
            )
        entry = state["timeline"][-1]
        entry.update(
            {
                "decision": decision.verdict,
                "reason": decision.reason,
                "figures": decision.to_json(),
                "updatedAt": _iso(now),
            }
        )
        if decision.verdict == "hold":
            if _timeless(state) != _timeless(loaded):  # nothing new: no etcd write
                state["updatedAt"] = _iso(now)
                await self.store.put_analysis(agent, state)
            return state
        state["updatedAt"] = _iso(now)
        entry["decidedAt"] = _iso(now)
        if decision.verdict == "fail":
            details = {"step": step_index, "weight": step.weight, **decision.to_json()}
            await self.cp.abort(
                self.principal,
                agent,
                message=f"analysis step {step_index} ({step.weight} %): {decision.reason}",
                action="auto-abort",
                details=details,
                expected_version=version,
            )
            state["phase"] = "aborted"
            logger.warning(
                "release of %s aborted at step %d (%d %%): %s",
                agent,
                step_index,
                step.weight,
                decision.reason,
            )
        elif step_index + 1 >= len(release.analysis.steps):
            await self.cp.promote(
                self.principal,
                agent,
                message=f"analysis passed {len(release.analysis.steps)} steps",
                details={"step": step_index, "weight": step.weight, **decision.to_json()},
                expected_version=version,
            )
            state["phase"] = "promoted"
            logger.info("release of %s promoted: every analysis step passed", agent)
        else:
            nxt = release.analysis.steps[step_index + 1]
            evaluation = await self._evaluate(agent, release)
            if evaluation is not None and not evaluation.passed:
                return await self._evaluation_failed(
                    agent, release, version, step_index + 1, evaluation, state
                )
            await self._set_weight(agent, release, version, nxt.weight, step_index + 1)
            now = self.clock()  # the new window starts after the evaluation's calls
            state["step"] = step_index + 1
            state["stepStartedAt"] = _iso(now)
            if self.requests is not None:  # the next step's window begins now
                state["window"] = Window.start(await self._scrape(agent)).to_json()
            state["timeline"].append(_entry(step_index + 1, nxt.weight, now, evaluation))
        await self.store.put_analysis(agent, state)
        return state

    async def _scrape(self, agent: str) -> dict[str, InstanceScrape]:
        assert self.requests is not None
        return await self.requests.scrape(agent)

    async def _ended_how(self, agent: str) -> tuple[str, str]:
        """The phase and reason of an analysis whose release changed under it: ``aborted``
        or ``promoted`` when the last release change was this loop's own (it stopped before
        recording it), else ``cancelled``."""
        last = next(iter(await self.store.audit_entries(name=agent, kind="Release", limit=1)), None)
        if last is not None and last.actor == self.principal.name:
            ended = {"release.auto-abort": "aborted", "release.promote": "promoted"}
            if last.action in ended:
                return ended[last.action], last.message
        return "cancelled", "the release changed outside the analysis"

    async def _unready_for(self, agent: str, state: dict[str, Any], now: datetime) -> float | None:
        """Seconds the canary track has been seen with no ready instance (None: it has one,
        or no controller reports); the time it was first seen so is kept in ``state``."""
        status = await self.store.get_status(agent)
        if status is None or int((status.get("tracks") or {}).get("canary", {}).get("ready") or 0):
            state.pop("canaryUnreadySince", None)
            return None
        since = state.setdefault("canaryUnreadySince", _iso(now))
        return (now - datetime.fromisoformat(since)).total_seconds()

    async def _canary_ready(self, agent: str) -> bool:
        """Whether the canary track has a ready instance (the controller's observed state);
        True when no controller reports (no runtime: the operator runs the workloads)."""
        status = await self.store.get_status(agent)
        if status is None:
            return True
        ready = int((status.get("tracks") or {}).get("canary", {}).get("ready") or 0)
        if not ready:
            logger.info("release analysis of %s waits for a ready canary instance", agent)
        return ready > 0

    async def _evaluate(self, agent: str, release: ReleaseSpec) -> EvaluationResult | None:
        """The release's evaluation run against the canary (None when it has none); every
        case fails when this loop has no evaluator (it cannot run, so it cannot pass)."""
        assert release.analysis is not None
        spec = release.analysis.evaluation
        if spec is None:
            return None
        if self.evaluator is None:
            return not_run(spec, "this control plane runs no evaluations (no token issuer)")
        result = await self.evaluator.run(agent, spec)
        logger.info("release evaluation of %s: %s", agent, result.reason)
        return result

    async def _evaluation_failed(
        self,
        agent: str,
        release: ReleaseSpec,
        version: int,
        index: int,
        evaluation: EvaluationResult,
        state: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """Abort the release: step ``index``'s evaluation failed before its weight was set."""
        assert release.analysis is not None and release.canary_revision is not None
        weight = release.analysis.steps[index].weight
        await self.cp.abort(
            self.principal,
            agent,
            message=f"analysis step {index} ({weight} %): {evaluation.reason}",
            action="auto-abort",
            details={"step": index, "weight": weight, "evaluation": evaluation.to_json()},
            expected_version=version,
        )
        now = self.clock()
        entry = _entry(index, weight, now, evaluation)
        entry.update(decision="fail", reason=evaluation.reason, decidedAt=_iso(now))
        if state is None:
            state = {
                "canaryRevision": release.canary_revision,
                "stableRevision": release.stable_revision
                or await self.store.current_revision(agent),
                "step": index,
                "steps": len(release.analysis.steps),
                "startedAt": _iso(now),
                "stepStartedAt": _iso(now),
                "timeline": [],
            }
        state["timeline"].append(entry)
        state.update(phase="aborted", step=index, updatedAt=_iso(now))
        await self.store.put_analysis(agent, state)
        logger.warning(
            "release of %s aborted before step %d (%d %%): %s",
            agent,
            index,
            weight,
            evaluation.reason,
        )
        return state

    async def _start(
        self,
        agent: str,
        release: ReleaseSpec,
        version: int,
        *,
        stable: int,
        now: datetime,
        evaluation: EvaluationResult | None = None,
    ) -> dict[str, Any]:
        assert release.analysis is not None and release.canary_revision is not None
        first = release.analysis.steps[0]
        await self._set_weight(agent, release, version, first.weight, 0)
        state: dict[str, Any] = {
            "canaryRevision": release.canary_revision,
            "stableRevision": stable,
            "phase": "running",
            "step": 0,
            "steps": len(release.analysis.steps),
            "startedAt": _iso(now),
            "stepStartedAt": _iso(now),
            "updatedAt": _iso(now),
            "timeline": [_entry(0, first.weight, now, evaluation)],
        }
        if self.requests is not None:
            state["window"] = Window.start(await self._scrape(agent)).to_json()
        await self.store.put_analysis(agent, state)
        logger.info(
            "release analysis of %s: canary revision %d at %d %%",
            agent,
            release.canary_revision,
            first.weight,
        )
        return state

    async def _set_weight(
        self, agent: str, release: ReleaseSpec, version: int, weight: int, step: int
    ) -> None:
        if release.canary_weight == weight:
            return
        await self.store.put_release(
            agent,
            release.model_copy(update={"canary_weight": weight}),
            actor=self.principal.name,
            message=f"analysis step {step}: canary at {weight} %",
            action="set",
            expected_version=version,
        )


def _timeless(value: Any) -> Any:
    """``value`` without its ``updatedAt`` stamps (what a hold compares)."""
    if isinstance(value, dict):
        return {k: _timeless(v) for k, v in value.items() if k != "updatedAt"}
    if isinstance(value, list):
        return [_timeless(v) for v in value]
    return value


def _entry(
    step: int, weight: int, now: datetime, evaluation: EvaluationResult | None = None
) -> dict[str, Any]:
    return {
        "evaluation": evaluation.to_json() if evaluation is not None else None,
        "step": step,
        "weight": weight,
        "startedAt": _iso(now),
        "decision": "hold",
        "reason": "started",
        "figures": None,
        "decidedAt": None,
        "updatedAt": _iso(now),
    }
