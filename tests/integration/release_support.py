"""An agent's observed state as the controller writes it, for tests whose control plane
runs no controller: a release is refused when it sends calls to a track the controller saw
with no ready instance (or never saw), so these tests report the tracks they need ready."""

from __future__ import annotations

from datetime import UTC, datetime

from specmesh.store import SpecStore
from specmesh.workloads import AgentStatus, TrackStatus

__all__ = ["observe_tracks"]


async def observe_tracks(
    store: SpecStore,
    agent: str,
    *,
    stable: int = 1,
    canary: int = 0,
    desired: int = 1,
    observed_at: datetime | None = None,
) -> None:
    """Write ``agent``'s status with ``stable``/``canary`` ready instances (of ``desired``
    per track), observed at ``observed_at`` (now by default), where the controller writes
    it."""
    tracks = {
        "stable": TrackStatus(desired=desired, ready=stable),
        "canary": TrackStatus(desired=desired, ready=canary),
    }
    status = AgentStatus(
        agent=agent,
        revision=1,
        runtime="local",
        tracks=tracks,
        instances=[],
        phase="Running",
        observed_at=(observed_at or datetime.now(UTC)).isoformat(),
    )
    await store.put_status(agent, status.to_json())
