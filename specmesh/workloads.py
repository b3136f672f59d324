"""Desired and observed workloads: what the controller asks a runtime to run for an agent,
and what it reports back.

The controller (``control_plane/controller.py``) turns each stored agent into an
:class:`AgentWorkload` -- replicas per release track, from the current revision's
``deployment`` part and the release policy -- and hands it to a runtime (the local
supervisor, or Kubernetes). It writes what the runtime observes, joined with the Agent
Registry, as an :class:`AgentStatus` at ``<prefix>/status/<agent>``, which ``get``,
``describe``, the API and the Studio show.

Instance phases (the local supervisor's; Kubernetes pods map onto them)::

    Starting    its processes (containers) run, the sidecar is not ready yet
    Running     both processes run and the sidecar is ready (engine serving)
    Unready     both run, the sidecar was ready and is not now (its engine is not serving)
    CrashLoop   a process exited soon after starting, again: waiting out a back-off
    Stopping    draining: out of the registry, processes stopping
    Failed      cannot be started at all (its start raised: the reason is in lastError)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from specmesh.names import resource_name
from specmesh.spec.models import MAX_REPLICAS, DeploymentSpec, ReleaseSpec

__all__ = [
    "PHASES",
    "TRACKS",
    "AgentStatus",
    "AgentWorkload",
    "InstanceStatus",
    "TrackStatus",
    "desired_replicas",
]

TRACKS: tuple[str, ...] = ("stable", "canary")
PHASES: tuple[str, ...] = ("Starting", "Running", "Unready", "CrashLoop", "Stopping", "Failed")


def desired_replicas(deployment: DeploymentSpec, release: ReleaseSpec | None) -> dict[str, int]:
    """Instances to run per track. The canary track runs when the deployment enables it or
    a release names a canary revision (a release in progress needs its canary); with
    autoscaling, a track starts at ``min`` (on Kubernetes the autoscaler moves it)."""
    canary_on = deployment.tracks.canary.enabled or (
        release is not None and release.canary_revision is not None
    )
    if deployment.autoscaling.enabled:
        stable = deployment.autoscaling.min
        canary = deployment.autoscaling.min
    else:
        stable = deployment.tracks.stable.replicas
        canary = deployment.tracks.canary.replicas
    return {"stable": stable, "canary": canary if canary_on else 0}


@dataclass(frozen=True)
class AgentWorkload:
    """Desired state of one agent, as handed to a runtime."""

    agent: str
    """The logical agent name."""
    revision: int
    """The agent's current revision (whose ``deployment`` part this is)."""
    replicas: dict[str, int]
    """Track -> instances to run (a track at 0 runs none)."""
    deployment: DeploymentSpec = field(default_factory=DeploymentSpec)
    """The current ``deployment`` part (resources, autoscaling) for runtimes that use it."""

    @property
    def name(self) -> str:
        """The agent's resource name (process, pod and key names use it)."""
        return resource_name(self.agent)

    def fingerprint(self) -> str:
        """Changes exactly when what a runtime must run changes."""
        data = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(data.encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        return {
            "agent": self.agent,
            "revision": self.revision,
            "replicas": dict(self.replicas),
            "deployment": self.deployment.model_dump(mode="json", by_alias=True),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AgentWorkload:
        replicas = {str(k): int(v) for k, v in dict(data.get("replicas", {})).items()}
        unknown = sorted(set(replicas) - set(TRACKS))
        if unknown:
            raise ValueError(f"unknown track(s) {', '.join(unknown)} (tracks: {TRACKS})")
        if any(not 0 <= v <= MAX_REPLICAS for v in replicas.values()):
            raise ValueError(f"replicas must be 0 to {MAX_REPLICAS} per track")
        return cls(
            agent=str(data["agent"]),
            revision=int(data.get("revision", 0)),
            replicas=replicas,
            deployment=DeploymentSpec.model_validate(data.get("deployment", {})),
        )


@dataclass(frozen=True)
class InstanceStatus:
    """One instance (engine + sidecar pair, or pod) as a runtime observes it."""

    instance: str
    """Its id: the registry's instance name (``<agent>-<track>-<n>`` locally, the pod name
    on Kubernetes)."""
    track: str
    phase: str
    """One of :data:`PHASES`."""
    ready: bool = False
    """Its sidecar's readiness (engine alive and serving)."""
    revision: int = 0
    """The spec revision its engine serves (0: none yet)."""
    restarts: int = 0
    """Process (container) restarts since it was created."""
    last_error: str | None = None
    """Why it last exited or failed to start."""
    since: str = ""
    """When it entered its phase (ISO 8601)."""
    endpoints: dict[str, str] = field(default_factory=dict)
    """Where it listens (local runtime: ``a2a``, ``ops``, ``inbound``...)."""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["lastError"] = out.pop("last_error")
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InstanceStatus:
        return cls(
            instance=str(data["instance"]),
            track=str(data.get("track", "stable")),
            phase=str(data.get("phase", "Starting")),
            ready=bool(data.get("ready", False)),
            revision=int(data.get("revision", 0)),
            restarts=int(data.get("restarts", 0)),
            last_error=data.get("lastError"),
            since=str(data.get("since", "")),
            endpoints={str(k): str(v) for k, v in dict(data.get("endpoints", {})).items()},
        )


@dataclass(frozen=True)
class TrackStatus:
    desired: int = 0
    ready: int = 0

    def to_json(self) -> dict[str, int]:
        return {"desired": self.desired, "ready": self.ready}


@dataclass(frozen=True)
class AgentStatus:
    """An agent's observed state, written by the controller."""

    agent: str
    revision: int
    """The revision the controller last reconciled."""
    runtime: str
    """``local`` or ``kubernetes``."""
    tracks: dict[str, TrackStatus]
    instances: list[InstanceStatus]
    phase: str
    """``Running`` (every track at its desired ready count), ``Progressing``, ``CrashLoop``
    (an instance crash-loops), ``Failed`` (the runtime refused the workload), ``Stopped``
    (no instance desired)."""
    last_error: str | None = None
    observed_at: str = ""

    @property
    def ready_text(self) -> str:
        """``ready/desired`` over all tracks, as ``kubectl get`` shows it."""
        ready = sum(t.ready for t in self.tracks.values())
        desired = sum(t.desired for t in self.tracks.values())
        return f"{ready}/{desired}"

    def to_json(self) -> dict[str, Any]:
        return {
            "agent": self.agent,
            "revision": self.revision,
            "runtime": self.runtime,
            "phase": self.phase,
            "ready": self.ready_text,
            "tracks": {k: v.to_json() for k, v in self.tracks.items()},
            "instances": [i.to_json() for i in self.instances],
            "lastError": self.last_error,
            "observedAt": self.observed_at,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AgentStatus:
        return cls(
            agent=str(data["agent"]),
            revision=int(data.get("revision", 0)),
            runtime=str(data.get("runtime", "")),
            tracks={
                str(k): TrackStatus(desired=int(v.get("desired", 0)), ready=int(v.get("ready", 0)))
                for k, v in dict(data.get("tracks", {})).items()
            },
            instances=[InstanceStatus.from_json(i) for i in data.get("instances", [])],
            phase=str(data.get("phase", "")),
            last_error=data.get("lastError"),
            observed_at=str(data.get("observedAt", "")),
        )

    @classmethod
    def build(
        cls,
        workload: AgentWorkload,
        instances: list[InstanceStatus],
        *,
        runtime: str,
        error: str | None = None,
        observed_at: str = "",
    ) -> AgentStatus:
        """The status of ``workload`` from what the runtime observed."""
        tracks = {
            track: TrackStatus(
                desired=workload.replicas.get(track, 0),
                ready=sum(1 for i in instances if i.track == track and i.ready),
            )
            for track in TRACKS
            if workload.replicas.get(track, 0) or any(i.track == track for i in instances)
        }
        crash = next((i for i in instances if i.phase in ("CrashLoop", "Failed")), None)
        desired = sum(workload.replicas.values())
        if error is not None:
            phase = "Failed"
        elif crash is not None:
            phase = "CrashLoop" if crash.phase == "CrashLoop" else "Failed"
        elif desired == 0 and not instances:
            phase = "Stopped"
        elif all(t.ready >= t.desired for t in tracks.values()) and len(instances) == desired:
            phase = "Running"
        else:
            phase = "Progressing"
        last_error = error or next((i.last_error for i in instances if i.last_error), None)
        return cls(
            agent=workload.agent,
            revision=workload.revision,
            runtime=runtime,
            tracks=tracks,
            instances=sorted(instances, key=lambda i: (TRACKS.index(i.track), i.instance)),
            phase=phase,
            last_error=last_error,
            observed_at=observed_at,
        )
