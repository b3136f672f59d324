"""Desired replicas from the deployment part and the release, and an agent's observed
phase from its instances."""

from __future__ import annotations

import pytest

from specmesh.spec.models import DeploymentSpec, ReleaseSpec
from specmesh.workloads import AgentStatus, AgentWorkload, InstanceStatus, desired_replicas


def _deployment(**data: object) -> DeploymentSpec:
    return DeploymentSpec.model_validate(data)


@pytest.mark.parametrize(
    ("deployment", "release", "expected"),
    [
        ({}, None, {"stable": 1, "canary": 0}),
        ({"tracks": {"stable": {"replicas": 3}}}, None, {"stable": 3, "canary": 0}),
        ({"tracks": {"canary": {"enabled": True, "replicas": 2}}}, None,
         {"stable": 1, "canary": 2}),
        # a release naming a canary revision runs the canary track even when not enabled
        ({}, ReleaseSpec(canary_revision=2, canary_weight=10), {"stable": 1, "canary": 1}),
        ({"tracks": {"canary": {"replicas": 0}}}, ReleaseSpec(canary_revision=2),
         {"stable": 1, "canary": 0}),
        ({"autoscaling": {"enabled": True, "min": 2, "max": 4}}, None,
         {"stable": 2, "canary": 0}),
        ({"tracks": {"stable": {"replicas": 0}}}, None, {"stable": 0, "canary": 0}),
    ],
)  # fmt: skip
def test_desired_replicas(
    deployment: dict[str, object], release: ReleaseSpec | None, expected: dict[str, int]
) -> None:
    assert desired_replicas(_deployment(**deployment), release) == expected


def test_autoscaling_min_above_max_is_refused_naming_both() -> None:
    with pytest.raises(ValueError, match=r"min \(5\) is above max \(2\)"):
        _deployment(autoscaling={"enabled": True, "min": 5, "max": 2})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"agent": "a", "replicas": {"blue": 1}}, "unknown track"),
        ({"agent": "a", "replicas": {"stable": -1}}, "0 to 100"),
        ({"agent": "a", "replicas": {"stable": 101}}, "0 to 100"),
    ],
)
def test_a_bad_workload_is_refused(data: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AgentWorkload.from_json(data)


def test_a_workload_round_trips_and_its_fingerprint_follows_what_runs() -> None:
    w = AgentWorkload(agent="Billing_Helper", revision=3, replicas={"stable": 2, "canary": 0})
    assert w.name == "billing-helper"
    assert AgentWorkload.from_json(w.to_json()) == w
    assert w.fingerprint() == AgentWorkload.from_json(w.to_json()).fingerprint()
    scaled = AgentWorkload(agent="Billing_Helper", revision=3, replicas={"stable": 3, "canary": 0})
    assert scaled.fingerprint() != w.fingerprint()


def _inst(n: int, phase: str, ready: bool, track: str = "stable") -> InstanceStatus:
    return InstanceStatus(instance=f"a-{track}-{n}", track=track, phase=phase, ready=ready)


@pytest.mark.parametrize(
    ("replicas", "instances", "phase", "ready"),
    [
        ({"stable": 2}, [_inst(0, "Running", True), _inst(1, "Running", True)], "Running", "2/2"),
        ({"stable": 2}, [_inst(0, "Running", True), _inst(1, "Starting", False)],
         "Progressing", "1/2"),
        ({"stable": 1}, [_inst(0, "CrashLoop", False)], "CrashLoop", "0/1"),
        ({"stable": 0}, [], "Stopped", "0/0"),
        # scaled down: the extra instance still drains
        ({"stable": 1}, [_inst(0, "Running", True), _inst(1, "Stopping", False)],
         "Progressing", "1/1"),
        ({"stable": 1, "canary": 1},
         [_inst(0, "Running", True), _inst(0, "Running", True, "canary")], "Running", "2/2"),
    ],
)  # fmt: skip
def test_an_agents_phase_follows_its_instances(
    replicas: dict[str, int], instances: list[InstanceStatus], phase: str, ready: str
) -> None:
    status = AgentStatus.build(AgentWorkload("a", 1, replicas), instances, runtime="local")
    assert (status.phase, status.ready_text) == (phase, ready)
    assert AgentStatus.from_json(status.to_json()) == status


def test_a_refused_workload_is_failed_with_the_reason() -> None:
    status = AgentStatus.build(
        AgentWorkload("a", 1, {"stable": 1}), [], runtime="kubernetes", error="quota exceeded"
    )
    assert status.phase == "Failed" and status.last_error == "quota exceeded"
