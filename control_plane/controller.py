"""The controller: every stored agent runs, as its spec says, on a runtime.

Level-triggered and idempotent, like a Kubernetes controller:

* **desired state** is read from the store: per agent, the current revision's
  ``deployment`` part and its release policy give the instances per track
  (:func:`specmesh.workloads.desired_replicas`);
* it is handed whole to the runtime (:class:`control_plane.runtime.Runtime`): on start, on
  every change under ``<prefix>/agents/`` (the watch), and again every
  ``resync_seconds`` for every agent (a change the watch missed, a runtime restarted);
  agents the runtime runs that the store no longer holds are removed (pruned);
* a failed apply is retried with back-off (1 s doubling to :data:`MAX_BACKOFF`), and shows
  in the agent's status;
* every ``observe_seconds`` it reads what runs and writes each agent's observed state
  (:class:`specmesh.workloads.AgentStatus`) to ``<prefix>/status/<agent>`` when it
  changed, joined with the Agent Registry for the revision each instance serves.

It holds nothing that the store and the runtime do not: a restarted controller reads
both and finds nothing to change (the local supervisor's processes are adopted, not
restarted). Run one controller per store (one control-plane replica).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from control_plane.runtime import Runtime
from specmesh.aio import cancel_and_wait, wait_event
from specmesh.backoff import BackoffPolicy, Reconnect
from specmesh.errors import NotFoundError
from specmesh.names import resource_name
from specmesh.store import SpecStore
from specmesh.watch import PrefixWatcher
from specmesh.workloads import AgentStatus, AgentWorkload, InstanceStatus, desired_replicas

__all__ = ["MAX_BACKOFF", "Controller"]

logger = logging.getLogger(__name__)

MAX_BACKOFF = 60.0
"""Longest wait before retrying an agent whose apply failed."""
_RETRY_BACKOFF = BackoffPolicy(initial=1.0, maximum=MAX_BACKOFF, jitter=0.5)


class Controller:
    """Reconciles the store's agents with ``runtime``; see the module docstring."""

    def __init__(
        self,
        *,
        store: SpecStore,
        runtime: Runtime,
        resync_seconds: float = 30.0,
        observe_seconds: float = 2.0,
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.resync_seconds = resync_seconds
        self.observe_seconds = observe_seconds
        self.workloads: dict[str, AgentWorkload] = {}
        """Resource name -> the workload last handed to the runtime."""
        self.errors: dict[str, str] = {}
        """Resource name -> why its last apply failed."""
        self._failures: dict[str, tuple[int, float]] = {}
        self._dirty: set[str] = set()
        self._resync_due = True
        self._wake = asyncio.Event()
        self._written: dict[str, dict[str, Any]] = {}
        self.resyncs = 0

    # ------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Reconcile until cancelled."""
        watching = asyncio.create_task(self._watch(), name="controller-watch")
        last_resync = last_observe = 0.0
        failing = Reconnect(_RETRY_BACKOFF)
        try:
            while True:
                now = time.monotonic()
                try:
                    if self._resync_due or now - last_resync >= self.resync_seconds:
                        self._resync_due = False
                        last_resync = now
                        await self.resync()
                    else:
                        dirty, self._dirty = self._dirty, set()
                        for name in sorted(dirty | self._retries_due(now)):
                            await self.reconcile(name)
                    if time.monotonic() - last_observe >= self.observe_seconds:
                        last_observe = time.monotonic()
                        await self.observe()
                    failing.reset()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    delay = failing.next_delay()
                    logger.exception("reconciling failed; retrying in %.1f s", delay)
                    self._resync_due = True
                    await failing.wait(delay)
                self._wake.clear()
                await wait_event(self._wake, self.observe_seconds)
        finally:
            await cancel_and_wait(watching)

    async def _watch(self) -> None:
        """Mark the agents whose meta or release changed (a spec part alone changes only
        with its meta)."""
        prefix = self.store.keys.agents()
        watcher = PrefixWatcher(etcd=self.store.etcd, prefix=prefix)
        try:
            async for update in watcher.updates():
                if update.reset:
                    self._resync_due = True
                for event in update.events:
                    name, _, rest = event.key.removeprefix(prefix).partition("/")
                    if rest in ("meta", "release"):
                        self._dirty.add(name)
                self._wake.set()
        finally:
            watcher.close()

    def _retries_due(self, now: float) -> set[str]:
        return {name for name, (_, at) in self._failures.items() if at <= now}

    # ------------------------------------------------------------ reconcile

    async def resync(self) -> None:
        """Hand every agent's desired state to the runtime; remove what it runs for agents
        the store no longer holds."""
        self.resyncs += 1
        stored = {resource_name(a.name) for a in await self.store.list_agents()}
        for name in sorted(stored):
            await self.reconcile(name, force=True)
        for name in sorted(set(self.workloads) - stored):
            await self.reconcile(name)
        try:
            running = await self.runtime.running()
        except Exception as e:
            logger.warning("cannot list what the %s runtime runs: %s", self.runtime.name, e)
            return
        if not stored and running:
            # an empty store beside a runtime that runs agents is far likelier a control plane
            # pointed at the wrong etcd or prefix than every agent deleted while it was away
            logger.warning(
                "the store holds no agent but the %s runtime runs %d: not removing them "
                "(check SPECMESH_ETCD_ENDPOINT / SPECMESH_ETCD_PREFIX)",
                self.runtime.name,
                len(running),
            )
            return
        for name in sorted(running - stored):
            logger.info("removing %s: the store holds no such agent", name)
            with contextlib.suppress(Exception):
                await self.runtime.remove(name)

    async def reconcile(self, name: str, *, force: bool = False) -> None:
        """Make the runtime run agent ``name`` (a resource name) as the store says."""
        try:
            workload = await self.desired(name)
        except Exception as e:
            self._failed(name, f"reading its spec: {e}")
            return
        try:
            if workload is None:
                if name in self.workloads or force:
                    await self.runtime.remove(name)
                self.workloads.pop(name, None)
                self._written.pop(name, None)
                self._failures.pop(name, None)
                self.errors.pop(name, None)
                with contextlib.suppress(Exception):
                    await self.store.delete_status(name)
                logger.info("agent %s removed from the %s runtime", name, self.runtime.name)
                return
            previous = self.workloads.get(name)
            if force or previous is None or previous.fingerprint() != workload.fingerprint():
                await self.runtime.apply(workload)
                if previous is None or previous.fingerprint() != workload.fingerprint():
                    logger.info(
                        "agent %s revision %d: %s on the %s runtime",
                        workload.agent,
                        workload.revision,
                        ", ".join(f"{t} {n}" for t, n in workload.replicas.items()),
                        self.runtime.name,
                    )
            self.workloads[name] = workload
            self._failures.pop(name, None)
            self.errors.pop(name, None)
        except Exception as e:
            if workload is not None:
                self.workloads[name] = workload  # its status shows the failure
            self._failed(name, str(e))

    def _failed(self, name: str, error: str) -> None:
        count = self._failures.get(name, (0, 0.0))[0] + 1
        delay = _RETRY_BACKOFF.delay(count)
        self._failures[name] = (count, time.monotonic() + delay)
        self.errors[name] = error
        logger.warning("agent %s: %s (retry %d in %.0fs)", name, error, count, delay)

    async def desired(self, name: str) -> AgentWorkload | None:
        """The workload the store asks for agent ``name``; None once it is deleted."""
        try:
            record = await self.store.get_agent(name)
        except NotFoundError:
            return None
        spec = record.spec_model()
        release = await self.store.get_release(name)
        return AgentWorkload(
            agent=record.name,
            revision=record.revision,
            replicas=desired_replicas(spec.deployment, release),
            deployment=spec.deployment,
        )

    # ------------------------------------------------------------ observe

    async def observe(self) -> None:
        """Write each agent's observed state where it changed (one look at the runtime for
        all agents)."""
        seen: dict[str, list[InstanceStatus]] = {}
        failed: Exception | None = None
        if self.workloads:
            try:
                seen = await self.runtime.observe_all()
            except Exception as e:
                failed = e
        for name, workload in list(self.workloads.items()):
            error = self.errors.get(name)
            try:
                if failed is not None:
                    raise failed
                instances = await self._join_registry(name, seen.get(name, []))
                status = AgentStatus.build(
                    workload, instances, runtime=self.runtime.name, error=error
                )
            except Exception as e:
                status = replace(
                    AgentStatus.build(workload, [], runtime=self.runtime.name),
                    phase="Unknown",
                    last_error=f"cannot observe it: {e}",
                )
            data = status.to_json()
            data.pop("observedAt")
            if self._written.get(name) == data:
                continue
            stamped = {**data, "observedAt": datetime.now(UTC).isoformat(timespec="seconds")}
            try:
                await self.store.put_status(workload.agent, stamped)
            except Exception as e:
                logger.warning("cannot write the status of %s: %s", name, e)
                continue
            self._written[name] = data

    async def _join_registry(
        self, name: str, instances: list[InstanceStatus]
    ) -> list[InstanceStatus]:
        """The served revision of instances whose runtime does not know it, from the
        Agent Registry (instance ids are the registry's)."""
        if all(i.revision for i in instances):
            return instances
        registered = {r.get("instance"): r for r in await self.store.list_instances(name)}
        out = []
        for inst in instances:
            entry = registered.get(inst.instance)
            if not inst.revision and entry and entry.get("state") == "serving":
                inst = replace(inst, revision=int(entry.get("revision") or 0))
            out.append(inst)
        return out
