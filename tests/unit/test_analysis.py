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


@pytest.mark.parametrize(
    ("canary_n", "canary_errors", "canary_latency", "gate"),
    [(25, 0.3, 0.5, "errorRate"), (60, 0.0, 2.0, "p95Latency")],
    ids=["thirty-percent-errors", "four-times-slower"],
)
def test_a_worse_canary_is_aborted_by_the_gate_it_fails(
    canary_n: int, canary_errors: float, canary_latency: float, gate: str
) -> None:
    rng = random.Random(17)
    decision = judge(
        ANALYSIS,
        ANALYSIS.steps[0],
        held_seconds=60,
        stable=_window(rng, 200, 0.0, 0.5),
        canary=_window(rng, canary_n, canary_errors, canary_latency),
    )
    assert decision.verdict == "fail"
    assert [g.gate for g in decision.failed_gates] == [gate]
    figures = decision.to_json()
    assert [g["failed"] for g in figures["gates"] if g["gate"] == gate] == [True]
    assert figures["canary"]["requests"] == canary_n


@pytest.mark.parametrize(
    ("held_seconds", "canary", "reason"),
    [
        (600, TrackWindow(requests=5, errors=5), "not enough data: stable 100, canary 5"),
        (30, TrackWindow(requests=100, errors=90), "held 30s of 60s"),
    ],
    ids=["too-few-canary-turns", "step-not-over"],
)
def test_a_step_holds_whatever_the_canary_looks_like_until_it_ends_with_enough_data(
    held_seconds: float, canary: TrackWindow, reason: str
) -> None:
    decision = judge(
        ANALYSIS,
        ANALYSIS.steps[0],
        held_seconds=held_seconds,
        stable=TrackWindow(requests=100, errors=0),
        canary=canary,
    )
    assert decision.verdict == "hold"
    assert reason in decision.reason


def _verdicts(
    analysis: dict[str, object], held_seconds: float, pairs: list[tuple[TrackWindow, TrackWindow]]
) -> list[tuple[str, list[bool]]]:
    """(verdict, which gates were judged) for each (stable, canary) pair on the first step."""
    spec = AnalysisSpec.model_validate(analysis)
    out = []
    for stable, canary in pairs:
        d = judge(spec, spec.steps[0], held_seconds=held_seconds, stable=stable, canary=canary)
        out.append((d.verdict, [g.judged for g in d.gates]))
    return out


def test_min_canary_requests_holds_until_reached() -> None:
    analysis = {"steps": [{"weight": 10, "minCanaryRequests": 40}], "minSamplePerTrack": 5}
    verdicts = _verdicts(
        analysis,
        0,
        [
            (TrackWindow(requests=100), TrackWindow(requests=39)),
            (TrackWindow(requests=100), TrackWindow(requests=40)),
        ],
    )
    assert verdicts == [("hold", []), ("pass", [])]


def test_the_cost_gate_is_not_judged_without_prices_and_fails_a_costlier_canary() -> None:
    analysis = {
        "steps": [{"weight": 10, "durationSeconds": 1}],
        "gates": {"maxCostPerTurnRatio": 1.2},
        "minSamplePerTrack": 20,
    }
    unpriced = (
        TrackWindow(requests=30, costs=[0.0] * 30),
        TrackWindow(requests=30, costs=[0.01] * 30),
    )
    costly = (
        TrackWindow(requests=30, costs=[0.001] * 30),
        TrackWindow(requests=30, costs=[0.002] * 30),
    )
    assert _verdicts(analysis, 1, [unpriced, costly]) == [("pass", [False]), ("fail", [True])]


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


def test_a_100_percent_step_is_refused_since_it_could_never_be_judged() -> None:
    # at 100 % stable answers nothing in the step's window, so no gate could ever compare
    # (a canary failing every turn would hold forever): the last step passing promotes
    with pytest.raises(ValidationError) as caught:
        AnalysisSpec.model_validate(
            {
                "steps": [
                    {"weight": 50, "durationSeconds": 60},
                    {"weight": 100, "durationSeconds": 60},
                ],
                "gates": {"maxErrorRateIncrease": 0.05},
            }
        )
    assert "steps.1.weight" in str(caught.value)
    assert "a step cannot send 100 % to the canary" in str(caught.value)
