"""The statistics of analysis-gated releases: one step's decision from two windows of turns.

Pure: no I/O, no clock. :func:`judge` takes the release's :class:`AnalysisSpec`, the step,
how long it has held, and a :class:`TrackWindow` per track (the turns each answered since
the step began) and returns a :class:`StepDecision`:

* ``hold``: the step is not over (its ``durationSeconds`` or ``minCanaryRequests`` is not
  reached), or a track has fewer than ``minSamplePerTrack`` turns. Not enough data extends
  the hold; it never aborts.
* ``fail``: at the end of the step, some gate is failed: the canary is worse than stable
  beyond the gate's threshold **with the configured confidence** (one-sided).
* ``pass``: at the end of the step, with enough data, no gate failed.

Each gate, with ``z`` the one-sided normal quantile of ``confidence`` (1.645 at 0.95):

* error rate: fails when the Wilson lower bound of the canary's error rate minus the
  Wilson upper bound of stable's exceeds ``maxErrorRateIncrease``;
* p95 latency: judged only with at least ``max(minSamplePerTrack, 20)`` latencies per
  track; fails when the canary's p95 lower bound (a distribution-free order-statistic bound)
  exceeds ``maxP95LatencyRatio`` times stable's p95 upper bound; with latencies counted in
  buckets (:class:`LatencyHistogram`, the sidecars' histograms) the bounds are the edges of
  the buckets holding those ranks (wider, so still conservative);
* cost per turn: fails when the canary's mean cost lower bound (mean - z·s/√n) exceeds
  ``maxCostPerTurnRatio`` times stable's upper bound; not judged while stable's mean cost
  is 0 (prices unknown).

Comparing the worse-case bound of each track makes a gate conservative: a canary equal to
stable fails it with probability well below ``1 - confidence``, and since a decision is taken
only once, at the end of a step, noise within the step cannot flap it. See docs/analysis.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, Literal, TypeVar

from specmesh.spec.models import AnalysisSpec, AnalysisStep

__all__ = [
    "MIN_LATENCY_SAMPLE",
    "GateResult",
    "LatencyHistogram",
    "StepDecision",
    "TrackWindow",
    "judge",
    "quantile_bounds",
    "wilson_bounds",
]

MIN_LATENCY_SAMPLE = 20
"""Fewest latencies per track before a p95 is compared (below it the tail is a guess)."""

Verdict = Literal["hold", "pass", "fail"]


@dataclass(frozen=True)
class LatencyHistogram:
    """Latencies counted in buckets (a Prometheus histogram): ``buckets`` are
    ``(upper bound in seconds, cumulative count)``, ascending, the last bound ``inf``.

    A quantile is known only to within its bucket: :meth:`quantile_bounds` takes the
    order-statistic ranks of :func:`quantile_bounds` and answers the LOWER edge of the
    bucket holding the low rank and the UPPER edge of the bucket holding the high rank --
    wider than the exact bounds, so a gate built on them stays conservative."""

    buckets: tuple[tuple[float, int], ...]

    def __post_init__(self) -> None:
        counts = [c for _, c in self.buckets]
        bounds = [b for b, _ in self.buckets]
        if counts != sorted(counts) or bounds != sorted(bounds) or min(counts, default=0) < 0:
            raise ValueError("histogram buckets must be ascending and cumulative")

    @property
    def count(self) -> int:
        return self.buckets[-1][1] if self.buckets else 0

    def _bucket(self, rank: int) -> tuple[float, float]:
        """(lower edge, upper edge) of the bucket holding the ``rank``-th latency (1-based)."""
        lower = 0.0
        for bound, cumulative in self.buckets:
            if cumulative >= rank:
                return lower, bound
            lower = bound
        return lower, math.inf

    def quantile(self, q: float) -> float | None:
        """An estimate (linear within the bucket, as Prometheus' ``histogram_quantile``; the
        lower edge in the last, unbounded bucket)."""
        n = self.count
        if n == 0:
            return None
        rank = q * n
        lower, previous = 0.0, 0
        for bound, cumulative in self.buckets:
            if cumulative >= rank and cumulative > previous:
                if math.isinf(bound):
                    return lower
                return lower + (bound - lower) * (rank - previous) / (cumulative - previous)
            lower, previous = bound, cumulative
        return lower

    def quantile_bounds(self, q: float, z: float) -> tuple[float, float]:
        n = self.count
        if n == 0:
            raise ValueError("no values")
        spread = z * math.sqrt(n * q * (1 - q))
        low = max(1, math.floor(n * q - spread))
        high = min(n, math.ceil(n * q + spread) + 1)
        return self._bucket(low)[0], self._bucket(high)[1]


@dataclass(frozen=True)
class TrackWindow:
    """The turns one track answered in a window."""

    requests: int = 0
    errors: int = 0
    latencies: Sequence[float] = ()
    """Seconds per turn."""
    costs: Sequence[float] = ()
    """Model cost (USD) per turn."""
    histogram: LatencyHistogram | None = None
    """The turns' latencies in buckets (the sidecars' metrics); when set, the p95 gate
    judges it instead of ``latencies``."""

    @property
    def latency_count(self) -> int:
        return self.histogram.count if self.histogram is not None else len(self.latencies)

    @property
    def p95(self) -> float | None:
        if self.histogram is not None:
            return self.histogram.quantile(0.95)
        return _p95(self.latencies)

    def __post_init__(self) -> None:
        if not 0 <= self.errors <= self.requests:
            raise ValueError(
                f"errors must be within 0..requests (got {self.errors}/{self.requests})"
            )

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "errorRate": round(self.error_rate, 4),
            "p95Seconds": _round(self.p95),
            "costPerTurn": _round(_mean(self.costs), 8),
        }


@dataclass(frozen=True)
class GateResult:
    """One gate's figures and outcome (``judged`` False: not enough data to compare)."""

    gate: str
    threshold: float
    canary: float | None
    stable: float | None
    bound: float | None
    """The canary-worse-than-stable figure compared with ``threshold`` (an increase or a
    ratio of bounds)."""
    judged: bool
    failed: bool
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "gate": self.gate,
            "threshold": self.threshold,
            "canary": _round(self.canary, 6),
            "stable": _round(self.stable, 6),
            "bound": _round(self.bound, 6),
            "judged": self.judged,
            "failed": self.failed,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class StepDecision:
    verdict: Verdict
    reason: str
    gates: list[GateResult] = field(default_factory=list)
    stable: TrackWindow = TrackWindow()
    canary: TrackWindow = TrackWindow()

    @property
    def failed_gates(self) -> list[GateResult]:
        return [g for g in self.gates if g.failed]

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "reason": self.reason,
            "stable": self.stable.to_json(),
            "canary": self.canary.to_json(),
            "gates": [g.to_json() for g in self.gates],
        }


# ---------------------------------------------------------------- statistics


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _p95(values: Sequence[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


def _z(confidence: float) -> float:
    return NormalDist().inv_cdf(confidence)


def wilson_bounds(successes: int, n: int, z: float) -> tuple[float, float]:
    """Wilson score interval of a proportion (lower, upper); (0, 1) when ``n`` is 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def quantile_bounds(values: Sequence[float], q: float, z: float) -> tuple[float, float]:
    """A distribution-free confidence interval of the ``q`` quantile: the order statistics
    at ranks ``nq ∓ z·√(nq(1-q))`` (normal approximation of the binomial rank)."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("no values")
    spread = z * math.sqrt(n * q * (1 - q))
    low = max(1, math.floor(n * q - spread))
    high = min(n, math.ceil(n * q + spread) + 1)
    return ordered[low - 1], ordered[high - 1]


def _mean_bounds(values: Sequence[float], z: float) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    variance = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    half = z * math.sqrt(variance / n)
    return max(0.0, mean - half), mean + half


# ---------------------------------------------------------------- gates


def _error_gate(threshold: float, stable: TrackWindow, canary: TrackWindow, z: float) -> GateResult:
    canary_low, _ = wilson_bounds(canary.errors, canary.requests, z)
    _, stable_high = wilson_bounds(stable.errors, stable.requests, z)
    increase = canary_low - stable_high
    return GateResult(
        gate="errorRate",
        threshold=threshold,
        canary=canary.error_rate,
        stable=stable.error_rate,
        bound=increase,
        judged=True,
        failed=increase > threshold,
        reason=(
            f"canary error rate >= {canary_low:.3f} vs stable <= {stable_high:.3f}: "
            f"increase {increase:+.3f} (max {threshold})"
        ),
    )


_Data = TypeVar("_Data")


def _ratio_gate(
    gate: str,
    threshold: float,
    *,
    stable: _Data,
    canary: _Data,
    statistic: Callable[[_Data], float | None],
    bounds: Callable[[_Data, float], tuple[float, float]],
    z: float,
    unjudged: str | None,
    unit: str = "",
) -> GateResult:
    """Fails when the canary's lower bound exceeds ``threshold`` times stable's upper bound
    (``bounds(data, z)`` -> lower, upper); not judged when ``unjudged`` says why."""
    bound: float | None = None
    reason = unjudged or ""
    if unjudged is None:
        canary_low, _ = bounds(canary, z)
        _, stable_high = bounds(stable, z)
        bound = canary_low / stable_high if stable_high > 0 else (math.inf if canary_low else 1.0)
        reason = (
            f"canary >= {canary_low:.6g}{unit} vs stable <= {stable_high:.6g}{unit}: "
            f"ratio {bound:.2f} (max {threshold})"
        )
    return GateResult(
        gate=gate,
        threshold=threshold,
        canary=statistic(canary),
        stable=statistic(stable),
        bound=bound,
        judged=bound is not None,
        failed=bound is not None and bound > threshold,
        reason=reason,
    )


def _latency_gate(
    threshold: float, stable: TrackWindow, canary: TrackWindow, z: float, minimum: int
) -> GateResult:
    few = min(canary.latency_count, stable.latency_count) < minimum
    unjudged = f"fewer than {minimum} latencies on a track" if few else None
    if canary.histogram is not None and stable.histogram is not None:
        return _ratio_gate(
            "p95Latency",
            threshold,
            stable=stable.histogram,
            canary=canary.histogram,
            statistic=lambda histogram: histogram.quantile(0.95),
            bounds=lambda histogram, z: histogram.quantile_bounds(0.95, z),
            z=z,
            unjudged=unjudged,
            unit="s",
        )
    return _ratio_gate(
        "p95Latency",
        threshold,
        stable=stable.latencies,
        canary=canary.latencies,
        statistic=_p95,
        bounds=lambda values, z: quantile_bounds(values, 0.95, z),
        z=z,
        unjudged=unjudged,
        unit="s",
    )


def _cost_gate(
    threshold: float, stable: TrackWindow, canary: TrackWindow, z: float, minimum: int
) -> GateResult:
    unjudged = None
    if min(len(canary.costs), len(stable.costs)) < minimum:
        unjudged = f"fewer than {minimum} priced turns on a track"
    elif not _mean(stable.costs):
        unjudged = "stable's cost per turn is 0 (prices unknown)"
    return _ratio_gate(
        "costPerTurn",
        threshold,
        stable=stable.costs,
        canary=canary.costs,
        statistic=_mean,
        bounds=_mean_bounds,
        z=z,
        unjudged=unjudged,
    )


def judge(
    analysis: AnalysisSpec,
    step: AnalysisStep,
    *,
    held_seconds: float,
    stable: TrackWindow,
    canary: TrackWindow,
) -> StepDecision:
    """The decision on ``step`` after ``held_seconds``; see the module docstring."""

    def decision(
        verdict: Verdict, reason: str, gates: list[GateResult] | None = None
    ) -> StepDecision:
        return StepDecision(verdict, reason, gates or [], stable=stable, canary=canary)

    if step.duration_seconds is not None and held_seconds < step.duration_seconds:
        return decision("hold", f"held {held_seconds:.0f}s of {step.duration_seconds:g}s")
    if step.min_canary_requests is not None and canary.requests < step.min_canary_requests:
        return decision(
            "hold", f"canary answered {canary.requests} of {step.min_canary_requests} turns"
        )
    minimum = analysis.min_sample_per_track
    if min(stable.requests, canary.requests) < minimum:
        return decision(
            "hold",
            f"not enough data: stable {stable.requests}, canary {canary.requests} turns "
            f"(at least {minimum} each)",
        )
    z = _z(analysis.confidence)
    gates = analysis.gates
    results: list[GateResult] = []
    if gates.max_error_rate_increase is not None:
        results.append(_error_gate(gates.max_error_rate_increase, stable, canary, z))
    if gates.max_p95_latency_ratio is not None:
        results.append(
            _latency_gate(
                gates.max_p95_latency_ratio, stable, canary, z, max(minimum, MIN_LATENCY_SAMPLE)
            )
        )
    if gates.max_cost_per_turn_ratio is not None:
        results.append(_cost_gate(gates.max_cost_per_turn_ratio, stable, canary, z, minimum))
    failed = [g for g in results if g.failed]
    if failed:
        return decision("fail", "; ".join(f"{g.gate}: {g.reason}" for g in failed), results)
    if any(not g.judged for g in results):
        unjudged = [g for g in results if not g.judged and g.gate == "p95Latency"]
        if unjudged:  # latencies come with every turn: wait for them
            return decision("hold", f"p95Latency: {unjudged[0].reason}", results)
    return decision("pass", "every gate passed", results)
