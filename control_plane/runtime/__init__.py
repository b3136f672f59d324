"""Runtimes: where the controller's workloads run.

One interface, two implementations: :mod:`control_plane.runtime.local` (the local
supervisor, one engine + sidecar pair of processes per instance) and
:mod:`control_plane.runtime.kubernetes` (Deployments, Services... applied with server-side
apply). The controller is level-triggered: it calls :meth:`Runtime.apply` with the whole
desired state of an agent whenever it looks, so every method is idempotent.
"""

from __future__ import annotations

from typing import Protocol

from specmesh.workloads import AgentWorkload, InstanceStatus

__all__ = ["Runtime"]


class Runtime(Protocol):
    """What the controller needs of a runtime."""

    name: str
    """``local`` or ``kubernetes`` (shown in an agent's status)."""

    async def apply(self, workload: AgentWorkload) -> None:
        """Make what runs for ``workload.agent`` match it (start, stop, scale); return once
        the change is under way, not when it is ready. Raises on a refusal."""
        ...

    async def remove(self, agent: str) -> None:
        """Stop and remove everything run for the agent (by resource name); nothing run
        for it is fine."""
        ...

    async def running(self) -> set[str]:
        """Resource names of the agents this runtime runs anything for (to prune)."""
        ...

    async def observe(self, agent: str) -> list[InstanceStatus]:
        """The agent's instances as they are now (by resource name)."""
        ...

    async def observe_all(self) -> dict[str, list[InstanceStatus]]:
        """Every agent's instances as they are now, by resource name: one look for all
        (the controller observes every few seconds, whatever the number of agents)."""
        ...

    async def close(self) -> None:
        """Release connections; what runs keeps running."""
        ...
