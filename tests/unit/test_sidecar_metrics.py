"""The window of the sidecars' counts since a step began: deltas per revision over every
instance, counter resets (a restarted sidecar), instances that vanish or appear, and the
JSON kept in etcd; the p95 bounds read from a histogram's buckets."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest

from control_plane.analysis import LatencyHistogram, quantile_bounds
from control_plane.sidecar_metrics import Counts, InstanceScrape, Window

STEP = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
BEFORE = "2026-11-30T11:00:00+00:00"
INF = math.inf


def _scrape(started: str = BEFORE, **revisions: tuple[int, int]) -> InstanceScrape:
    """``r1=(requests, errors)``: every request in the 0.5 s bucket."""
    return InstanceScrape(
        started_at=started,
        revisions={
            int(name[1:]): Counts(req, err, {0.5: req, INF: req})
            for name, (req, err) in revisions.items()
        },
    )


def _figures(window: Window) -> dict[int, tuple[int, int, int]]:
    return {r: (c.requests, c.errors, c.buckets[INF]) for r, c in window.totals().items()}


def test_the_window_counts_what_happened_since_the_step_began() -> None:
    window = Window.start({"a": _scrape(r1=(100, 2)), "b": _scrape(r2=(40, 0))})
    window.update({"a": _scrape(r1=(130, 3)), "b": _scrape(r2=(50, 6))}, step_started=STEP)
    assert _figures(window) == {1: (30, 1, 30), 2: (10, 6, 10)}


def test_a_restarted_instance_counts_from_zero_and_keeps_what_it_counted_before() -> None:
    window = Window.start({"a": _scrape(r1=(100, 0))})
    window.update({"a": _scrape(r1=(120, 1))}, step_started=STEP)  # +20, 1 error
    # the process restarted: counters lower than at its last scrape
    window.update({"a": _scrape(r1=(5, 2))}, step_started=STEP)
    assert _figures(window) == {1: (25, 3, 25)}
    # a restart that counted past its old figures is told by its new start time
    window.update({"a": _scrape(r1=(6, 2))}, step_started=STEP)
    window.update({"a": _scrape("2026-11-30T12:05:00+00:00", r1=(200, 0))}, step_started=STEP)
    assert _figures(window) == {1: (226, 3, 226)}


def test_a_vanished_instance_keeps_its_last_counts() -> None:
    window = Window.start({"a": _scrape(r1=(10, 0)), "b": _scrape(r2=(10, 0))})
    window.update({"a": _scrape(r1=(20, 0)), "b": _scrape(r2=(18, 4))}, step_started=STEP)
    window.update({"a": _scrape(r1=(25, 0))}, step_started=STEP)  # b is gone
    assert _figures(window) == {1: (15, 0, 15), 2: (8, 4, 8)}


def test_an_instance_that_appeared_during_the_step_counts_from_zero() -> None:
    window = Window.start({"a": _scrape(r1=(10, 0))})
    later = "2026-11-30T12:01:00+00:00"
    window.update({"a": _scrape(r1=(10, 0)), "new": _scrape(later, r2=(7, 1))}, step_started=STEP)
    assert _figures(window) == {1: (0, 0, 0), 2: (7, 1, 7)}
    # one that was there but unreadable at the start counts from its first scrape
    window.update({"old": _scrape(BEFORE, r2=(50, 0))}, step_started=STEP)
    window.update({"old": _scrape(BEFORE, r2=(53, 1))}, step_started=STEP)
    assert _figures(window)[2] == (10, 2, 10)


def test_the_window_survives_its_json_in_etcd() -> None:
    window = Window.start({"a": _scrape(r1=(10, 0))})
    window.update({"a": _scrape(r1=(3, 1))}, step_started=STEP)  # a reset: carried
    again = Window.from_json(window.to_json())
    again.update({"a": _scrape(r1=(9, 1))}, step_started=STEP)
    assert _figures(again) == {1: (9, 1, 9)}
    assert Window.from_json(None).totals() == {}


def test_histogram_bounds_are_the_edges_of_the_buckets_holding_the_exact_bounds() -> None:
    values = [0.01 * i for i in range(1, 201)]  # 0.01 .. 2.0
    edges = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, INF)
    histogram = LatencyHistogram(tuple((e, sum(v <= e for v in values)) for e in edges))
    exact_low, exact_high = quantile_bounds(values, 0.95, 1.645)
    low, high = histogram.quantile_bounds(0.95, 1.645)
    assert low <= exact_low and high >= exact_high  # wider: conservative
    assert (low, high) == (1.0, 2.0)
    estimate = histogram.quantile(0.95)
    assert estimate is not None and 1.0 < estimate <= 2.0
    assert LatencyHistogram(((1.0, 0), (INF, 3))).quantile(0.95) == 1.0  # the unbounded bucket


def test_a_histogram_must_be_cumulative() -> None:
    with pytest.raises(ValueError, match="cumulative"):
        LatencyHistogram(((0.5, 3), (INF, 2)))


def test_the_p95_gate_judges_histograms() -> None:
    from control_plane.analysis import TrackWindow, judge
    from specmesh.spec.models import AnalysisSpec

    spec = AnalysisSpec.model_validate(
        {
            "steps": [{"weight": 10, "minCanaryRequests": 50}],
            "gates": {"maxP95LatencyRatio": 1.5},
            "minSamplePerTrack": 50,
        }
    )

    def track(fast: int, slow: int) -> TrackWindow:
        edges = ((0.25, fast), (1.0, fast), (4.0, fast + slow), (INF, fast + slow))
        return TrackWindow(requests=fast + slow, histogram=LatencyHistogram(edges))

    stable = track(200, 0)  # every turn within 0.25 s
    slow = judge(spec, spec.steps[0], held_seconds=0, stable=stable, canary=track(150, 50))
    same = judge(spec, spec.steps[0], held_seconds=0, stable=stable, canary=track(200, 0))
    assert slow.verdict == "fail" and slow.gates[0].bound == pytest.approx(1.0 / 0.25)
    assert same.verdict == "pass"
