"""The Agent Registry: this instance's entry, and a live view of every agent's instances.

:class:`InstanceRegistration` writes ``<prefix>/registry/<agent>/<instance>`` under an etcd
lease (TTL default 10 s) and keeps the lease alive every TTL/3. When etcd was down for
longer than the TTL the lease is gone: the keep-alive answers TTL 0 (or a write answers
"lease not found") and the entry is written again under a new lease. ``update()`` changes
the served revision or state (written at once); ``stop()`` revokes the lease, which
deletes the entry. The value is JSON (``docs/runtime.md``)::

    {"instance", "agent", "endpoint", "track", "revision", "state", "startedAt",
     "grpcEndpoint"?, "opsEndpoint"?, "card"?}

``state`` is ``starting`` (no engine report yet), what the engine reports (``serving``,
``degraded``, ``failed``), or ``engine-down`` (:data:`ENGINE_DOWN`: the engine's snapshot
stream is closed, its process is gone); the router picks only ``serving`` and ``degraded``
instances.

:class:`RegistryView` watches ``<prefix>/registry/`` and keeps agent resource name ->
instances for the router, with a change counter to wait on and change listeners.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from sidecar.ops import SidecarMetrics
from specmesh.aio import cancel_and_wait, wait_event
from specmesh.backoff import BackoffPolicy, Reconnect
from specmesh.errors import StoreError, StoreUnavailableError
from specmesh.etcd import EtcdClient
from specmesh.keys import Keys
from specmesh.names import resource_name
from specmesh.watch import PrefixWatcher, WatchUpdate

__all__ = ["ENGINE_DOWN", "Instance", "InstanceRegistration", "RegistryView"]

logger = logging.getLogger(__name__)

ENGINE_DOWN = "engine-down"
"""Registry state of an instance whose engine is not connected to its sidecar."""


@dataclass(frozen=True)
class Instance:
    """One live instance of an agent, as registered."""

    instance: str
    agent: str
    endpoint: str
    track: str = "stable"
    revision: int = 0
    state: str = "starting"
    started_at: str = ""
    card: dict[str, Any] | None = field(default=None, compare=True, hash=False)
    """The engine's A2A agent card for the served revision (what the Agent Registry shows)."""
    grpc_endpoint: str | None = None
    """``host:port`` of its sidecar's A2A gRPC inbound (``grpcEndpoint``), when it has one."""
    ops_endpoint: str | None = None
    """``http://host:port`` of its sidecar's ops listener (``opsEndpoint``: ``/metrics``, read
    by the control plane's release analysis)."""

    def to_json(self) -> dict[str, Any]:
        out = {
            "instance": self.instance,
            "agent": self.agent,
            "endpoint": self.endpoint,
            "track": self.track,
            "revision": self.revision,
            "state": self.state,
            "startedAt": self.started_at,
        }
        if self.card is not None:
            out["card"] = self.card
        if self.grpc_endpoint is not None:
            out["grpcEndpoint"] = self.grpc_endpoint
        if self.ops_endpoint is not None:
            out["opsEndpoint"] = self.ops_endpoint
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Instance:
        return cls(
            instance=str(data["instance"]),
            agent=str(data["agent"]),
            endpoint=str(data["endpoint"]),
            track=str(data.get("track", "stable")),
            revision=int(data.get("revision", 0)),
            state=str(data.get("state", "")),
            started_at=str(data.get("startedAt", "")),
            card=data.get("card"),
            grpc_endpoint=str(data["grpcEndpoint"]) if data.get("grpcEndpoint") else None,
            ops_endpoint=str(data["opsEndpoint"]) if data.get("opsEndpoint") else None,
        )

    def encode(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))


class InstanceRegistration:
    """This instance's registry entry, held under a kept-alive lease."""

    def __init__(
        self,
        *,
        etcd: EtcdClient,
        keys: Keys,
        instance: Instance,
        ttl: int = 10,
        metrics: SidecarMetrics | None = None,
    ) -> None:
        self.etcd = etcd
        self.keys = keys
        self.key = keys.registry_instance(instance.agent, instance.instance)
        self.ttl = ttl
        self.metrics = metrics
        self._desired = instance
        self._written: str | None = None
        self.lease_id: int | None = None
        self._wake = asyncio.Event()
        self._registered = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def instance(self) -> Instance:
        """The entry as it should be (written at once when etcd answers)."""
        return self._desired

    @property
    def registered(self) -> bool:
        """Whether the entry is written under a lease believed alive."""
        return self._registered.is_set()

    @property
    def keepalive_task(self) -> asyncio.Task[None] | None:
        """The task that registers and keeps the lease alive (for diagnostics and tests)."""
        return self._task

    async def start(self) -> None:
        """Register in the background (retrying while etcd is unreachable)."""
        self._task = asyncio.create_task(self._run(), name=f"registry {self.key}")

    async def wait_registered(self) -> None:
        await self._registered.wait()

    def update(
        self,
        *,
        revision: int | None = None,
        state: str | None = None,
        card: dict[str, Any] | None = None,
    ) -> None:
        """Change the served revision, state and/or card; written without waiting for a tick."""
        changes: dict[str, Any] = {}
        if card is not None:
            changes["card"] = card
        if revision is not None:
            changes["revision"] = revision
        if state is not None:
            changes["state"] = state
        new = replace(self._desired, **changes)
        if new != self._desired:
            self._desired = new
            self._wake.set()

    async def stop(self) -> None:
        """Deregister: stop the keep-alive and revoke the lease (deleting the entry)."""
        task, self._task = self._task, None
        await cancel_and_wait(task)
        lease, self.lease_id = self.lease_id, None
        self._set_registered(False)
        if lease is None:
            return
        try:
            await self.etcd.lease_revoke(lease)
            logger.info("deregistered %s", self.key)
        except StoreError as e:
            # unreachable: the entry disappears when the lease's TTL ends
            logger.warning("could not revoke the lease of %s: %s", self.key, e)

    # ------------------------------------------------------------------ loop

    def _set_registered(self, value: bool) -> None:
        if value:
            self._registered.set()
        else:
            self._registered.clear()
        if self.metrics is not None:
            self.metrics.registry_registered.set(1 if value else 0)

    def _etcd_up(self, value: bool) -> None:
        if self.metrics is not None:
            self.metrics.etcd_up.set(1 if value else 0)

    async def _register(self) -> None:
        lease = await self.etcd.lease_grant(self.ttl)
        self.lease_id = lease
        value = self._desired.encode()
        await self.etcd.put(self.key, value, lease=lease)
        self._written = value
        self._set_registered(True)
        if self.metrics is not None:
            self.metrics.registry_registrations.inc()
        logger.info("registered %s under lease %x (ttl %ds)", self.key, lease, self.ttl)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = max(self.ttl / 3, 0.2)
        retry = min(interval, 1.0)
        reconnect = Reconnect(BackoffPolicy(initial=min(0.1, retry), maximum=retry, jitter=0.05))
        last_keepalive = loop.time()
        while True:
            try:
                if self.lease_id is None:
                    await self._register()
                    last_keepalive = loop.time()
                else:
                    if loop.time() - last_keepalive >= interval:
                        left = await self.etcd.lease_keepalive(self.lease_id)
                        if left <= 0:
                            logger.warning("lease of %s expired; registering again", self.key)
                            self.lease_id = None
                            self._set_registered(False)
                            continue
                        last_keepalive = loop.time()
                        self._set_registered(True)
                    value = self._desired.encode()
                    if value != self._written:
                        await self.etcd.put(self.key, value, lease=self.lease_id)
                        self._written = value
                self._etcd_up(True)
                reconnect.reset()
                wait = max(interval - (loop.time() - last_keepalive), 0.0)
            except StoreUnavailableError as e:
                self._etcd_up(False)
                if self.metrics is not None:
                    self.metrics.registry_keepalive_failures.inc()
                wait = reconnect.next_delay()
                logger.warning(
                    "registry %s: etcd unreachable (%s); retrying in %.2f s",
                    self.key,
                    e.reason,
                    wait,
                )
            except StoreError as e:  # e.g. "requested lease not found" on a put
                logger.warning("registry %s: %s; registering again", self.key, e)
                self.lease_id = None
                self._set_registered(False)
                wait = 0.0
            await wait_event(self._wake, wait)
            self._wake.clear()


class RegistryView:
    """Every agent's live instances, kept from a watch on ``<prefix>/registry/``."""

    def __init__(
        self,
        *,
        etcd: EtcdClient,
        keys: Keys,
        metrics: SidecarMetrics | None = None,
        retry_max: float = 2.0,
    ) -> None:
        self.etcd = etcd
        self.keys = keys
        self.metrics = metrics
        self.prefix = keys.registry()
        self._watcher = PrefixWatcher(etcd=etcd, prefix=self.prefix, retry_max=retry_max)
        self._by_key: dict[str, Instance] = {}
        self._by_agent: dict[str, list[Instance]] = {}
        self._version = 0
        self._changed = asyncio.Condition()
        self._listeners: list[Callable[[], None]] = []
        self._synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ reads

    def instances(self, agent: str) -> list[Instance]:
        """Live instances of ``agent`` (logical or resource name), sorted by instance."""
        found = self._by_agent.get(agent)  # already a resource name (the router's case)
        if found is None:
            found = self._by_agent.get(resource_name(agent), [])
        return list(found)

    def agents(self) -> dict[str, list[Instance]]:
        """Agent resource name -> instances."""
        return {name: list(items) for name, items in self._by_agent.items()}

    @property
    def version(self) -> int:
        """Increments on every change."""
        return self._version

    async def wait_changed(self, version: int) -> int:
        """Wait until :attr:`version` is greater than ``version``; return it."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._version > version)
            return self._version

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after every change."""
        self._listeners.append(listener)

    async def wait_synced(self) -> None:
        """Wait for the first full read of the registry."""
        await self._synced.wait()

    # ------------------------------------------------------------------ life

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="registry-view")

    async def stop(self) -> None:
        self._watcher.close()
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        async for update in self._watcher.updates():
            if self._apply(update):
                await self._notify()
            self._synced.set()

    def _apply(self, update: WatchUpdate) -> bool:
        before = dict(self._by_key)
        if update.snapshot is not None:
            self._by_key = {}
            for key, kv in update.snapshot.items():
                self._put(key, kv.value)
        for event in update.events:
            if event.type == "put":
                self._put(event.key, event.value)
            else:
                self._by_key.pop(event.key, None)
        if self._by_key == before:
            return False
        by_agent: dict[str, list[Instance]] = {}
        for key in sorted(self._by_key):
            agent = key[len(self.prefix) :].split("/", 1)[0]
            by_agent.setdefault(agent, []).append(self._by_key[key])
        self._by_agent = by_agent
        if self.metrics is not None:
            self.metrics.registry_view_instances.set(len(self._by_key))
        return True

    def _put(self, key: str, value: bytes) -> None:
        rest = key[len(self.prefix) :]
        if rest.count("/") != 1:
            return
        try:
            self._by_key[key] = Instance.from_json(json.loads(value))
        except (ValueError, KeyError, TypeError) as e:
            logger.warning("ignoring malformed registry entry %s: %s", key, e)
            self._by_key.pop(key, None)

    async def _notify(self) -> None:
        async with self._changed:
            self._version += 1
            self._changed.notify_all()
        for listener in self._listeners:
            try:
                listener()
            except Exception:
                logger.exception("registry listener failed")
