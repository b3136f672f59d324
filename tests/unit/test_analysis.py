"""The statistics of analysis-gated releases (control_plane/analysis.py)."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from control_plane.analysis import TrackWindow, judge, quantile_bounds, wilson_bounds
from specmesh.spec.models import AnalysisSpec, ReleaseSpec

ANALYSIS = AnalysisSpec.model_validate(
    {
        "steps": [{"weight": 10, "durationSeconds": 60}, {"weight": 50, "durationSeconds": 60}],
        "gates": {"maxErrorRateIncrease": 0.05, "maxP95LatencyRatio": 1.5},
        "minSamplePerTrack": 20,
    }
)


def _window(rng: random.Random, n: int, error_rate: float, latency: float) -> TrackWindow:
    errors = sum(rng.random() < error_rate for _ in range(n))
    latencies = [rng.lognormvariate(0, 0.5) * latency for _ in range(n)]
    return TrackWindow(requests=n, errors=errors, latencies=latencies, costs=[0.001] * n)


def test_a_canary_equal_to_stable_is_never_aborted_over_ten_runs_with_small_samples() -> None:
    rng = random.Random(17)
    verdicts = []
    for _ in range(10):
        stable = _window(rng, 200, 0.05, 0.5)
        canary = _window(rng, 25, 0.05, 0.5)  # a 10 % step: small samples on the canary
        verdicts.append(
            judge(ANALYSIS, ANALYSIS.steps[0], held_seconds=60, stable=stable, canary=canary)
        )
    assert [d.verdict for d in verdicts] == ["pass"] * 10, [d.reason for d in verdicts]


def test_a_canary_failing_thirty_percent_of_turns_is_aborted() -> None:
    rng = random.Random(17)
    decision = judge(
        ANALYSIS,
        ANALYSIS.steps[0],
        held_seconds=60,
        stable=_window(rng, 200, 0.0, 0.5),
        canary=_window(rng, 25, 0.3, 0.5),
    )
    assert decision.verdict == "fail"
    assert [g.gate for g in decision.failed_gates] == ["errorRate"]
    figures = decision.to_json()
    assert figures["canary"]["errors"] > 0
    assert figures["gates"][0]["failed"] is True


def test_a_slow_canary_fails_the_latency_gate() -> None:
    rng = random.Random(3)
    decision = judge(
        ANALYSIS,
        ANALYSIS.steps[0],
        held_seconds=60,
        stable=_window(rng, 200, 0.0, 0.5),
        canary=_window(rng, 60, 0.0, 2.0),
    )
    assert decision.verdict == "fail"
    assert [g.gate for g in decision.failed_gates] == ["p95Latency"]


def test_not_enough_data_holds_the_step_even_when_the_canary_looks_bad() -> None:
    decision = judge(
        ANALYSIS,
        ANALYSIS.steps[0],
        held_seconds=600,
        stable=TrackWindow(requests=100, errors=0),
        canary=TrackWindow(requests=5, errors=5),
    )
    assert decision.verdict == "hold"
    assert "not enough data" in decision.reason


def test_no_decision_before_the_step_ends() -> None:
    decision = judge(
        ANALYSIS,
        ANALYSIS.steps[0],
        held_seconds=30,
        stable=TrackWindow(requests=100, errors=0),
        canary=TrackWindow(requests=100, errors=90),
    )
    assert decision.verdict == "hold"


def test_min_canary_requests_holds_until_reached() -> None:
    analysis = AnalysisSpec.model_validate(
        {"steps": [{"weight": 10, "minCanaryRequests": 40}], "minSamplePerTrack": 5}
    )
    few = judge(
        analysis,
        analysis.steps[0],
        held_seconds=0,
        stable=TrackWindow(requests=100),
        canary=TrackWindow(requests=39),
    )
    enough = judge(
        analysis,
        analysis.steps[0],
        held_seconds=0,
        stable=TrackWindow(requests=100),
        canary=TrackWindow(requests=40),
    )
    assert (few.verdict, enough.verdict) == ("hold", "pass")


def test_the_cost_gate_is_not_judged_without_prices_and_fails_a_costlier_canary() -> None:
    analysis = AnalysisSpec.model_validate(
        {
            "steps": [{"weight": 10, "durationSeconds": 1}],
            "gates": {"maxCostPerTurnRatio": 1.2},
            "minSamplePerTrack": 20,
        }
    )
    step = analysis.steps[0]
    unpriced = judge(
        analysis,
        step,
        held_seconds=1,
        stable=TrackWindow(requests=30, costs=[0.0] * 30),
        canary=TrackWindow(requests=30, costs=[0.01] * 30),
    )
    costly = judge(
        analysis,
        step,
        held_seconds=1,
        stable=TrackWindow(requests=30, costs=[0.001] * 30),
        canary=TrackWindow(requests=30, costs=[0.002] * 30),
    )
    assert unpriced.verdict == "pass" and not unpriced.gates[0].judged
    assert costly.verdict == "fail"


def test_wilson_and_quantile_bounds_contain_the_estimate() -> None:
    low, high = wilson_bounds(6, 20, 1.645)
    assert low < 0.3 < high
    assert wilson_bounds(0, 0, 1.645) == (0.0, 1.0)
    values = list(range(1, 101))
    low_q, high_q = quantile_bounds(values, 0.95, 1.645)
    assert low_q <= 95 <= high_q


@pytest.mark.parametrize(
    ("analysis", "problem"),
    [
        ({"steps": []}, "at least 1"),
        (
            {"steps": [{"weight": 50, "durationSeconds": 1}, {"weight": 50, "durationSeconds": 1}]},
            "steps[1].weight must be greater than steps[0].weight",
        ),
        ({"steps": [{"weight": 101, "durationSeconds": 1}]}, "less than or equal to 100"),
        ({"steps": [{"weight": 10}]}, "set durationSeconds, minCanaryRequests or both"),
        ({"steps": [{"weight": i + 1, "durationSeconds": 1} for i in range(11)]}, "at most 10"),
        ({"steps": [{"weight": 10, "durationSeconds": 1}], "confidence": 1.5}, "0.999"),
    ],
)
def test_bad_analysis_is_refused_with_the_rule(analysis: dict[str, object], problem: str) -> None:
    with pytest.raises(ValidationError) as caught:
        ReleaseSpec.model_validate({"canaryRevision": 2, "analysis": analysis})
    assert problem in str(caught.value)
