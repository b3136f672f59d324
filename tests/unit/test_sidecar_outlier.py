"""Outlier detection (Envoy semantics) with an injected clock."""

from __future__ import annotations

from sidecar.outlier import OutlierDetector
from specmesh.spec.models import OutlierDetectionSpec


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _detector(clock: FakeClock, **policy: float) -> OutlierDetector:
    spec = OutlierDetectionSpec.model_validate(
        {
            "consecutive5xxErrors": 3,
            "intervalSeconds": 1,
            "baseEjectionTimeSeconds": 10,
            "maxEjectionPercent": 50,
            **policy,
        }
    )
    detector = OutlierDetector(policy=spec, clock=clock)
    detector.set_hosts(["a", "b", "c", "d"])
    return detector


def test_ejects_after_consecutive_5xx() -> None:
    clock = FakeClock()
    detector = _detector(clock)

    assert not detector.record("a", 500)
    assert not detector.record("a", 503)
    ejected = detector.record("a", 500)

    assert ejected
    assert detector.is_ejected("a")
    assert detector.available(["a", "b", "c", "d"]) == ["b", "c", "d"]


def test_a_success_resets_the_count() -> None:
    clock = FakeClock()
    detector = _detector(clock)

    detector.record("a", 500)
    detector.record("a", 500)
    detector.record("a", 200)
    detector.record("a", 500)
    detector.record("a", 500)

    assert not detector.is_ejected("a")


def test_gateway_errors_count_connect_failures_and_reset_on_other_5xx() -> None:
    clock = FakeClock()
    detector = _detector(clock, consecutive5xxErrors=0, consecutiveGatewayErrors=2)

    detector.record("a", 502)
    detector.record("a", 500)  # not a gateway error: resets that counter
    detector.record("a", 504)
    assert not detector.is_ejected("a")
    assert detector.record_local_failure("a")  # connection failure counts as 503

    assert detector.is_ejected("a")


def test_max_ejection_percent_is_respected() -> None:
    clock = FakeClock()
    detector = _detector(clock)

    for host in ("a", "b", "c", "d"):
        for _ in range(3):
            detector.record(host, 500)

    assert len(detector.ejected()) == 2  # 50 % of 4


def test_one_instance_may_always_be_ejected() -> None:
    clock = FakeClock()
    detector = _detector(clock, maxEjectionPercent=10)

    for host in ("a", "b"):
        for _ in range(3):
            detector.record(host, 500)

    assert detector.ejected() == ["a"]


def test_returns_after_base_times_number_of_ejections() -> None:
    clock = FakeClock()
    detector = _detector(clock)
    for _ in range(3):
        detector.record("a", 500)

    clock.advance(9.5)
    assert detector.is_ejected("a")
    clock.advance(1.0)  # 10.5 s: the next interval tick after 10 s un-ejects it
    assert not detector.is_ejected("a")

    for _ in range(3):  # ejected again at once: twice the base time now
        detector.record("a", 500)
    clock.advance(15)
    assert detector.is_ejected("a")
    clock.advance(6)
    assert not detector.is_ejected("a")
    assert detector.state("a").total_ejections == 2


def test_the_multiplier_decays_while_healthy() -> None:
    clock = FakeClock()
    detector = _detector(clock)
    for _ in range(3):
        detector.record("a", 500)
    clock.advance(11)
    assert not detector.is_ejected("a")

    clock.advance(5)  # five healthy intervals
    assert detector.state("a").times_ejected == 0
    for _ in range(3):
        detector.record("a", 500)
    clock.advance(10.5)
    assert not detector.is_ejected("a")  # back to the base time


def test_ejection_callback_fires() -> None:
    clock = FakeClock()
    seen: list[str] = []
    detector = OutlierDetector(
        policy=OutlierDetectionSpec.model_validate({"consecutive5xxErrors": 1}),
        clock=clock,
        on_eject=seen.append,
    )
    detector.set_hosts(["a", "b"])

    detector.record("b", 500)

    assert seen == ["b"]
