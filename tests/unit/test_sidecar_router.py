"""Router: stable/canary split, header match, ejection, retry budget, Istio mode."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from sidecar.router import (
    InMemoryInstanceSource,
    InMemoryReleaseSource,
    Instance,
    NoInstanceError,
    RetryBudget,
    RetryPolicy,
    Router,
    headers_match,
)
from specmesh.spec.models import HeaderMatch, ReleaseSpec, RetrySpec


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def _instances() -> InMemoryInstanceSource:
    return InMemoryInstanceSource(
        [
            Instance("s1", "Partner_Agent", "https://127.0.0.1:1001", "stable"),
            Instance("s2", "Partner_Agent", "https://127.0.0.1:1002", "stable"),
            Instance("c1", "Partner_Agent", "https://127.0.0.1:2001", "canary"),
        ]
    )


def _release(**fields: object) -> ReleaseSpec:
    return ReleaseSpec.model_validate({"stableRevision": 1, "canaryRevision": 2, **fields})


def test_ninety_ten_split_over_5000_picks_is_within_two_points() -> None:
    releases = InMemoryReleaseSource({"partner-agent": _release(canaryWeight=10)})
    router = Router(instances=_instances(), releases=releases, rng=random.Random(7))

    tracks = Counter(router.pick("Partner_Agent", {}).track for _ in range(5000))

    canary_share = tracks["canary"] / 5000 * 100
    assert 8 <= canary_share <= 12
    assert tracks["stable"] + tracks["canary"] == 5000


def test_header_match_sends_matching_calls_to_canary_only() -> None:
    release = _release(canaryWeight=0, headerMatch=[{"name": "X-User-Group", "exact": "beta"}])
    router = Router(
        instances=_instances(),
        releases=InMemoryReleaseSource({"partner-agent": release}),
        rng=random.Random(1),
    )

    matching = {router.pick("partner-agent", {"x-user-group": "beta"}).track for _ in range(500)}
    others = {router.pick("partner-agent", {"x-user-group": "alpha"}).track for _ in range(500)}

    assert matching == {"canary"}
    assert others == {"stable"}


def test_prefix_and_regex_matches() -> None:
    release = _release(
        headerMatch=[
            {"name": "x-tenant", "prefix": "acme-"},
            {"name": "x-build", "regex": "[0-9]+"},
        ]
    )
    router = Router(
        instances=_instances(), releases=InMemoryReleaseSource({"partner-agent": release})
    )

    assert router.choose_track("partner-agent", {"X-Tenant": "acme-1", "X-Build": "42"}) == (
        "canary"
    )
    assert router.choose_track("partner-agent", {"X-Tenant": "acme-1", "X-Build": "4a"}) == (
        "stable"
    )


def test_a_regex_that_backtracks_in_python_is_matched_by_re2_linearly() -> None:
    # Python's re takes exponential time on (a+)+b against a long run of a's and no b;
    # RE2 answers in linear time: no match, so the call goes to stable
    release = _release(headerMatch=[{"name": "x-build", "regex": "(a+)+b"}])
    router = Router(
        instances=_instances(), releases=InMemoryReleaseSource({"partner-agent": release})
    )

    assert router.choose_track("partner-agent", {"x-build": "a" * 100_000 + "c"}) == "stable"
    assert router.choose_track("partner-agent", {"x-build": "aaab"}) == "canary"


def test_a_regex_matches_the_whole_value_only() -> None:
    matches = [HeaderMatch(name="x-build", regex="[0-9]+")]

    assert headers_match(matches, {"x-build": "42"})
    assert not headers_match(matches, {"x-build": "42\n"})
    assert not headers_match(matches, {"x-build": "x42"})


def test_a_pattern_re2_refuses_matches_nothing_and_raises_nothing() -> None:
    # a release stored before patterns were checked: the sidecar must not fail the call
    stale = HeaderMatch.model_construct(name="x-build", exact=None, prefix=None, regex="(")

    assert not headers_match([stale], {"x-build": "("})


def test_without_release_every_call_goes_to_stable() -> None:
    router = Router(instances=_instances(), releases=InMemoryReleaseSource())

    tracks = {router.pick("partner-agent", {}).track for _ in range(200)}

    assert tracks == {"stable"}


def test_ejected_instances_are_skipped_and_retries_avoid_tried_ones() -> None:
    clock = FakeClock()
    release = _release(outlierDetection={"consecutive5xxErrors": 2, "maxEjectionPercent": 50})
    router = Router(
        instances=_instances(),
        releases=InMemoryReleaseSource({"partner-agent": release}),
        clock=clock,
        rng=random.Random(3),
    )
    target = router.pick("partner-agent", {})
    bad = target.instance
    router.report(target, 503)
    router.report(target, 500)

    picks = {router.pick("partner-agent", {}).instance for _ in range(100)}
    retry = router.pick("partner-agent", {}, exclude=["s1"])

    assert bad not in picks
    assert retry.instance != "s1"


def test_no_instance_raises() -> None:
    router = Router(instances=InMemoryInstanceSource(), releases=InMemoryReleaseSource())

    with pytest.raises(NoInstanceError):
        router.pick("partner-agent", {})


def test_only_instances_whose_engine_serves_are_picked() -> None:
    instances = InMemoryInstanceSource(
        [
            Instance("up", "partner-agent", "https://127.0.0.1:1001", state="serving"),
            Instance("old", "partner-agent", "https://127.0.0.1:1002", state="degraded"),
            Instance("dead", "partner-agent", "https://127.0.0.1:1003", state="engine-down"),
            Instance("new", "partner-agent", "https://127.0.0.1:1004", state="starting"),
            Instance("bad", "partner-agent", "https://127.0.0.1:1005", state="failed"),
        ]
    )
    router = Router(instances=instances, releases=InMemoryReleaseSource(), rng=random.Random(3))

    picked = {router.pick("partner-agent", {}).instance for _ in range(200)}

    assert picked == {"up", "old"}


def test_no_serving_instance_raises_naming_the_states() -> None:
    instances = InMemoryInstanceSource(
        [
            Instance("dead", "partner-agent", "https://127.0.0.1:1003", state="engine-down"),
            Instance("new", "partner-agent", "https://127.0.0.1:1004", state="starting"),
        ]
    )
    router = Router(instances=instances, releases=InMemoryReleaseSource())

    with pytest.raises(NoInstanceError) as caught:
        router.pick("partner-agent", {})

    assert caught.value.reason == "none serving (2 registered: engine-down, starting)"


def test_istio_mode_sends_to_the_service_and_does_not_retry() -> None:
    router = Router(
        instances=InMemoryInstanceSource(),
        releases=InMemoryReleaseSource({"partner-agent": _release(canaryWeight=50)}),
        mode="istio",
        namespace="agents",
        service_port=8080,
    )

    target = router.pick("Partner_Agent", {})

    assert target.url == "http://partner-agent.agents.svc.cluster.local:8080"
    assert target.instance is None
    assert router.retry_policy("partner-agent").attempts == 0
    assert not router.try_retry("partner-agent")


def test_retry_budget_caps_retries_to_its_percent_of_requests() -> None:
    clock = FakeClock()
    budget = RetryBudget(percent=20, window=10, min_retries=3, clock=clock)

    granted = 0
    for _ in range(100):
        budget.record_request()
        if budget.try_acquire():
            granted += 1

    assert granted == 20


def test_retry_budget_always_allows_the_minimum_and_refills_over_time() -> None:
    clock = FakeClock()
    budget = RetryBudget(percent=20, window=10, min_retries=3, clock=clock)
    budget.record_request()

    assert [budget.try_acquire() for _ in range(4)] == [True, True, True, False]
    clock.now += 11
    budget.record_request()
    assert budget.try_acquire()


def test_retry_policy_conditions() -> None:
    policy = RetryPolicy.from_spec(RetrySpec(attempts=2, per_try_timeout_seconds=1.5))

    assert policy.per_try_timeout == 1.5
    assert policy.retriable_status(503)
    assert not policy.retriable_status(500)
    assert policy.retriable_failure("connect")
    assert policy.retriable_failure("reset")
    assert policy.retriable_failure("timeout")
    assert not RetryPolicy(retry_on=frozenset({"reset"})).retriable_failure("connect")


def test_a_required_track_is_kept_whatever_the_weight_and_never_falls_back() -> None:
    releases = InMemoryReleaseSource({"partner-agent": _release(canaryWeight=0)})
    instances = _instances()
    router = Router(instances=instances, releases=releases, rng=random.Random(3))

    picked = {router.pick("partner-agent", {}, only="canary").instance for _ in range(50)}
    stable = {router.pick("partner-agent", {}, only="stable").track for _ in range(50)}
    instances.remove("partner-agent", "c1")

    assert (picked, stable) == ({"c1"}, {"stable"})
    with pytest.raises(NoInstanceError, match="none serving on track 'canary'"):
        router.pick("partner-agent", {}, only="canary")
    assert router.pick("partner-agent", {}).track == "stable"  # others still fall back
