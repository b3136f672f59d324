"""Routing of A2A calls: agent name -> instance.

The egress asks :class:`Router` where to send a call to a partner agent:

* the partner's instances come from an :class:`InstanceSource` (the Agent Registry; an
  in-memory one for tests); only those whose engine serves (registry state in
  :data:`SERVING_STATES`) are picked -- a starting, failed or dead engine takes no call;
* the split between its ``stable`` and ``canary`` instances follows the TARGET agent's release
  policy, read from a :class:`ReleaseSource` (etcd, watched; in-memory for tests): calls
  matching every ``headerMatch`` go to the canary, the others to the canary with probability
  ``canaryWeight`` %. When the chosen track has no instance, the other track serves (a canary
  whose instances have not started yet does not black-hole traffic);
* ejected instances (:class:`~sidecar.outlier.OutlierDetector`, one per partner) are skipped;
  a retry avoids the instances already tried when another one is available;
* :class:`RetryBudget` caps retries to ``budgetPercent`` of the requests in a sliding window.

In Istio mode the router returns the partner's Kubernetes service
(``http://<resource-name>.<namespace>.svc.cluster.local:<port>``) and leaves weights, ejection
and retries to Istio.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from specmesh import regex
from specmesh.keys import Keys
from specmesh.names import resource_name
from specmesh.spec.models import HeaderMatch, ReleaseSpec, RetrySpec
from specmesh.watch import PrefixWatcher

from .outlier import OutlierDetector

__all__ = [
    "SERVING_STATES",
    "EtcdReleaseSource",
    "InMemoryInstanceSource",
    "InMemoryReleaseSource",
    "Instance",
    "InstanceLike",
    "InstanceSource",
    "NoInstanceError",
    "ReleaseSource",
    "RetryBudget",
    "RetryPolicy",
    "Router",
    "RouterMode",
    "Target",
    "headers_match",
]

logger = logging.getLogger(__name__)

_resource_name = functools.lru_cache(maxsize=4096)(resource_name)
"""``resource_name`` remembered: the router maps the same few partner names on every call."""

RouterMode = Literal["direct", "istio"]

SERVING_STATES = frozenset({"serving", "degraded"})
"""Registry states of an instance whose engine serves a revision (``degraded``: an older one,
a newer one failed to build); the router picks only these."""


# ---------------------------------------------------------------- instances


@dataclass(frozen=True)
class Instance:
    """One live instance of an agent, as the Agent Registry lists it."""

    instance: str
    """Instance id (unique per agent)."""
    agent: str
    """Logical agent name."""
    endpoint: str
    """Inbound URL of its sidecar (``https://127.0.0.1:7105``)."""
    track: str = "stable"
    """``stable`` or ``canary``."""
    state: str = "serving"
    """Registry state (``serving``, ``starting``, ``engine-down``...)."""


class InstanceLike(Protocol):
    """What the router reads of an instance (``sidecar.registry.Instance`` has it)."""

    @property
    def instance(self) -> str: ...
    @property
    def agent(self) -> str: ...
    @property
    def endpoint(self) -> str: ...
    @property
    def track(self) -> str: ...
    @property
    def state(self) -> str: ...


class InstanceSource(Protocol):
    """Live instances by agent (``sidecar.registry.RegistryView`` implements this)."""

    def instances(self, agent: str) -> Sequence[InstanceLike]:
        """Instances of ``agent`` (logical or resource name), empty when none."""
        ...


class InMemoryInstanceSource:
    """Instances held in memory, keyed by resource name."""

    def __init__(self, instances: Iterable[Instance] = ()) -> None:
        self._by_agent: dict[str, dict[str, Instance]] = {}
        for inst in instances:
            self.add(inst)

    def add(self, instance: Instance) -> None:
        self._by_agent.setdefault(resource_name(instance.agent), {})[instance.instance] = instance

    def remove(self, agent: str, instance: str) -> None:
        self._by_agent.get(resource_name(agent), {}).pop(instance, None)

    def instances(self, agent: str) -> Sequence[Instance]:
        return list(self._by_agent.get(resource_name(agent), {}).values())


# ---------------------------------------------------------------- release policies


class ReleaseSource(Protocol):
    """The current release policy of any agent (the TARGET of a call)."""

    def release(self, agent: str) -> ReleaseSpec | None:
        """``agent``'s release policy, None when it has none."""
        ...


class InMemoryReleaseSource:
    """Release policies held in memory, keyed by resource name."""

    def __init__(self, releases: Mapping[str, ReleaseSpec] | None = None) -> None:
        self._releases = {resource_name(k): v for k, v in (releases or {}).items()}

    def set(self, agent: str, release: ReleaseSpec | None) -> None:
        if release is None:
            self._releases.pop(resource_name(agent), None)
        else:
            self._releases[resource_name(agent)] = release

    def release(self, agent: str) -> ReleaseSpec | None:
        return self._releases.get(resource_name(agent))


class EtcdReleaseSource:
    """Every agent's release policy, kept current by a watch on ``<prefix>/agents/``.

    Run :meth:`run` as a task; :meth:`wait_ready` returns once the first full read is in.
    A release that fails validation is logged and ignored (the previous one stays).
    """

    def __init__(self, *, watcher: PrefixWatcher, keys: Keys) -> None:
        self._watcher = watcher
        self._keys = keys
        self._releases: dict[str, ReleaseSpec] = {}
        self._ready = asyncio.Event()
        self.revision = 0

    def release(self, agent: str) -> ReleaseSpec | None:
        return self._releases.get(_resource_name(agent))

    async def wait_ready(self) -> None:
        await self._ready.wait()

    def _agent_of(self, key: str) -> str | None:
        root = self._keys.agents()
        if not key.startswith(root) or not key.endswith("/release"):
            return None
        rest = key[len(root) : -len("/release")]
        return rest if rest and "/" not in rest else None

    def _put(self, key: str, value: bytes) -> None:
        agent = self._agent_of(key)
        if agent is None:
            return
        try:
            self._releases[agent] = ReleaseSpec.model_validate_json(value)
        except ValueError:
            logger.warning("ignoring invalid release policy at %s", key)

    async def run(self) -> None:
        async for update in self._watcher.updates():
            if update.snapshot is not None:
                self._releases.clear()
                for key, kv in update.snapshot.items():
                    self._put(key, kv.value)
            for event in update.events:
                if event.type == "put":
                    self._put(event.key, event.value)
                else:
                    agent = self._agent_of(event.key)
                    if agent is not None:
                        self._releases.pop(agent, None)
            self.revision = update.revision
            self._ready.set()


# ---------------------------------------------------------------- retries


@dataclass(frozen=True)
class RetryPolicy:
    """How one call is retried (from the target's ``RetrySpec``)."""

    attempts: int = 2
    per_try_timeout: float = 30.0
    retry_on: frozenset[str] = frozenset({"connect-failure", "gateway-error", "reset"})

    @classmethod
    def from_spec(cls, spec: RetrySpec) -> RetryPolicy:
        on = frozenset(p.strip() for p in spec.retry_on.split(",") if p.strip())
        return cls(
            attempts=spec.attempts, per_try_timeout=spec.per_try_timeout_seconds, retry_on=on
        )

    def retriable_status(self, status: int) -> bool:
        if "5xx" in self.retry_on and status >= 500:
            return True
        if "gateway-error" in self.retry_on and status in (502, 503, 504):
            return True
        return "retriable-4xx" in self.retry_on and status == 409

    def retriable_failure(self, kind: Literal["connect", "reset", "timeout"]) -> bool:
        if "5xx" in self.retry_on:
            return True
        if kind == "connect":
            return bool({"connect-failure", "gateway-error"} & self.retry_on)
        if kind == "reset":
            return "reset" in self.retry_on
        return "gateway-error" in self.retry_on


class RetryBudget:
    """Retries may add at most ``percent`` % of the requests seen in the last ``window``
    seconds (but ``min_retries`` are always allowed, as Envoy's ``min_retry_concurrency``).

    Pure and clock-injected: :meth:`record_request` on every call, :meth:`try_acquire` before
    every retry.
    """

    def __init__(
        self,
        *,
        percent: float = 20.0,
        window: float = 10.0,
        min_retries: int = 3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.percent = percent
        self.window = window
        self.min_retries = min_retries
        self._clock = clock
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()

    def _trim(self, now: float) -> None:
        for q in (self._requests, self._retries):
            while q and q[0] <= now - self.window:
                q.popleft()

    def record_request(self) -> None:
        now = self._clock()
        self._trim(now)
        self._requests.append(now)

    def try_acquire(self) -> bool:
        """Take one retry from the budget; False when it is spent."""
        now = self._clock()
        self._trim(now)
        allowed = max(self.min_retries, int(len(self._requests) * self.percent / 100))
        if len(self._retries) >= allowed:
            return False
        self._retries.append(now)
        return True


# ---------------------------------------------------------------- the router


class NoInstanceError(Exception):
    """No instance of the agent can take the call."""

    def __init__(self, *, agent: str, reason: str) -> None:
        self.agent = agent
        self.reason = reason
        super().__init__(f"no instance of agent {agent!r}: {reason}")


@dataclass(frozen=True)
class Target:
    """Where one try goes."""

    agent: str
    """Resource name of the target agent."""
    url: str
    """Base URL (the instance's inbound endpoint, or the Istio service)."""
    instance: str | None = None
    """Instance id; None in Istio mode."""
    track: str | None = None


def headers_match(matches: Sequence[HeaderMatch], headers: Mapping[str, str]) -> bool:
    """Whether ``headers`` satisfy every match (header names case-insensitive; regex full
    match with RE2, as Istio does: linear time, each pattern compiled once)."""
    if not matches:
        return False
    lower = {k.lower(): v for k, v in headers.items()}
    for m in matches:
        value = lower.get(m.name.lower())
        if value is None:
            return False
        if m.exact is not None and value != m.exact:
            return False
        if m.prefix is not None and not value.startswith(m.prefix):
            return False
        if m.regex is not None and not regex.fullmatch(m.regex, value):
            return False
    return True


_DEFAULT_RETRIES = RetrySpec()


@dataclass
class _Upstream:
    detector: OutlierDetector
    budget: RetryBudget
    release: ReleaseSpec | None = field(default=None)


class Router:
    """Chooses an instance per try and learns from the outcomes."""

    def __init__(
        self,
        *,
        instances: InstanceSource,
        releases: ReleaseSource,
        mode: RouterMode = "direct",
        namespace: str = "default",
        service_port: int = 8080,
        service_scheme: str = "http",
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        on_ejection: Callable[[str, str], None] | None = None,
    ) -> None:
        self._instances = instances
        self._releases = releases
        self.mode: RouterMode = mode
        self.namespace = namespace
        self.service_port = service_port
        self.service_scheme = service_scheme
        self._clock = clock
        self._rng = rng or random.Random()
        self._on_ejection = on_ejection
        self._upstreams: dict[str, _Upstream] = {}
        self._retry_policies: dict[str, tuple[RetrySpec, RetryPolicy]] = {}

    def release(self, agent: str) -> ReleaseSpec | None:
        return self._releases.release(agent)

    def retry_policy(self, agent: str) -> RetryPolicy:
        """The target's retry policy; no retries in Istio mode (Istio retries)."""
        if self.mode == "istio":
            return RetryPolicy(attempts=0)
        release = self._releases.release(agent)
        spec = release.retries if release else _DEFAULT_RETRIES
        held = self._retry_policies.get(agent)
        if held is None or held[0] is not spec:  # kept per spec object: one per release
            held = (spec, RetryPolicy.from_spec(spec))
            if len(self._retry_policies) < 4096:
                self._retry_policies[agent] = held
        return held[1]

    def _upstream(self, agent: str) -> _Upstream:
        rn = _resource_name(agent)
        release = self._releases.release(rn)
        up = self._upstreams.get(rn)
        if up is None:
            on_eject = None
            if self._on_ejection is not None:
                callback = self._on_ejection
                on_eject = lambda host: callback(rn, host)  # noqa: E731
            detector = OutlierDetector(
                policy=release.outlier_detection if release else None,
                clock=self._clock,
                on_eject=on_eject,
            )
            budget = RetryBudget(
                percent=release.retries.budget_percent if release else 20.0, clock=self._clock
            )
            up = _Upstream(detector=detector, budget=budget, release=release)
            self._upstreams[rn] = up
        elif up.release != release:
            up.release = release
            if release is not None:
                up.detector.set_policy(release.outlier_detection)
                up.budget.percent = release.retries.budget_percent
        return up

    def detector(self, agent: str) -> OutlierDetector:
        return self._upstream(agent).detector

    def choose_track(
        self, agent: str, headers: Mapping[str, str], *, pinned: str | None = None
    ) -> Literal["stable", "canary"]:
        """The track a call goes to, by the target's release policy: a header match sends
        it to the canary; else a ``pinned`` track (a known conversation's) holds; else the
        weight decides."""
        release = self._releases.release(agent)
        if release is None or release.canary_revision is None:
            return "stable"
        if headers_match(release.header_match, headers):
            return "canary"
        if pinned in ("stable", "canary"):
            return "canary" if pinned == "canary" else "stable"
        if release.canary_weight > 0 and self._rng.random() * 100 < release.canary_weight:
            return "canary"
        return "stable"

    def pick(
        self,
        agent: str,
        headers: Mapping[str, str],
        *,
        exclude: Iterable[str] = (),
        pinned: str | None = None,
        only: Literal["stable", "canary"] | None = None,
    ) -> Target:
        """The target of one try; raise :class:`NoInstanceError` when none can take it.
        ``pinned``: the track a known conversation keeps (:meth:`choose_track`); ``only``:
        the track the call must go to (the control plane's evaluation of a canary), with no
        fallback to the other track."""
        rn = _resource_name(agent)
        if self.mode == "istio":
            host = f"{rn}.{self.namespace}.svc.cluster.local"
            return Target(agent=rn, url=f"{self.service_scheme}://{host}:{self.service_port}")
        up = self._upstream(rn)
        registered = list(self._instances.instances(rn))
        if not registered:
            raise NoInstanceError(agent=agent, reason="none registered")
        all_instances = [i for i in registered if i.state in SERVING_STATES]
        if not all_instances:
            states = ", ".join(sorted({i.state for i in registered}))
            raise NoInstanceError(
                agent=agent, reason=f"none serving ({len(registered)} registered: {states})"
            )
        up.detector.set_hosts(i.instance for i in all_instances)
        healthy_ids = set(up.detector.available([i.instance for i in all_instances]))
        track = only or self.choose_track(rn, headers, pinned=pinned)
        by_track = [i for i in all_instances if i.track == track]
        if not by_track and only is not None:
            raise NoInstanceError(agent=agent, reason=f"none serving on track {only!r}")
        if not by_track:
            by_track = [i for i in all_instances if i.track != track]
        candidates = [i for i in by_track if i.instance in healthy_ids]
        if not candidates:
            # Envoy's panic mode: when every instance is ejected, route to all of them.
            candidates = by_track
        excluded = set(exclude)
        fresh = [i for i in candidates if i.instance not in excluded]
        chosen = self._rng.choice(fresh or candidates)
        return Target(
            agent=rn, url=chosen.endpoint.rstrip("/"), instance=chosen.instance, track=chosen.track
        )

    # ------------------------------------------------------------ outcomes

    def record_request(self, agent: str) -> None:
        if self.mode != "istio":
            self._upstream(agent).budget.record_request()

    def try_retry(self, agent: str) -> bool:
        """Take one retry from the target's budget."""
        if self.mode == "istio":
            return False
        return self._upstream(agent).budget.try_acquire()

    def report(self, target: Target, status: int) -> None:
        """The answer of one try (an HTTP status)."""
        if target.instance is not None:
            self._upstream(target.agent).detector.record(target.instance, status)

    def report_failure(self, target: Target, *, timeout: bool = False) -> None:
        """A try that got no answer (connection failure, reset, timeout)."""
        if target.instance is not None:
            self._upstream(target.agent).detector.record_local_failure(
                target.instance, timeout=timeout
            )
