"""Outlier detection with Envoy's semantics, as a pure, clock-injected class.

One :class:`OutlierDetector` watches the instances of one upstream (one partner agent, an
Envoy *cluster*). The router reports the outcome of every try; the detector says which
instances may take traffic:

* **consecutive 5xx**: ``consecutive5xxErrors`` 5xx answers in a row eject the instance at
  once. A connection failure or a timeout (a locally originated error) counts as a 503 / 504,
  as Envoy does without ``split_external_local_origin_errors``.
* **consecutive gateway errors**: ``consecutiveGatewayErrors`` 502/503/504 (or connection
  failures, timeouts) in a row eject it; any other answer resets that counter.
* **ejection time**: ``baseEjectionTime x`` the number of times the instance has been ejected.
  Ejected instances return on the first evaluation tick (every ``interval``) after their time
  is up; an instance that stays healthy for an interval has its multiplier decreased by one.
* **max ejection percent**: an ejection that would put more than ``maxEjectionPercent`` of the
  instances out is skipped, except that one instance may always be ejected (Envoy: "will eject
  at least one host regardless of the value").

A counter that reaches its threshold is reset whether the ejection happened or was skipped
(so another run of errors is needed for the next attempt). Nothing here sleeps or reads the
wall clock: ``clock`` is injected (``time.monotonic`` by default) and ticks are evaluated
lazily on every call.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from specmesh.spec.models import OutlierDetectionSpec

__all__ = ["GATEWAY_ERRORS", "HostState", "OutlierDetector"]

GATEWAY_ERRORS = frozenset({502, 503, 504})


@dataclass
class HostState:
    """What the detector knows of one instance."""

    consecutive_5xx: int = 0
    consecutive_gateway: int = 0
    ejected_at: float | None = None
    times_ejected: int = 0
    """The ejection-time multiplier (decreases while the instance stays healthy)."""
    total_ejections: int = 0

    @property
    def ejected(self) -> bool:
        return self.ejected_at is not None


class OutlierDetector:
    """Envoy-style outlier detection over the instances of one upstream."""

    def __init__(
        self,
        *,
        policy: OutlierDetectionSpec | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_eject: Callable[[str], None] | None = None,
    ) -> None:
        self._policy = policy or OutlierDetectionSpec()
        self._clock = clock
        self._on_eject = on_eject
        self._hosts: dict[str, HostState] = {}
        self._next_tick = clock() + self._policy.interval_seconds

    @property
    def policy(self) -> OutlierDetectionSpec:
        return self._policy

    def set_policy(self, policy: OutlierDetectionSpec) -> None:
        """Apply a new policy (the target's release changed); state is kept."""
        if policy != self._policy:
            self._advance()
            self._policy = policy
            self._next_tick = min(self._next_tick, self._clock() + policy.interval_seconds)

    def set_hosts(self, hosts: Iterable[str]) -> None:
        """The current instances (from the registry); unknown ones are added, gone ones
        forgotten."""
        wanted = set(hosts)
        for host in list(self._hosts):
            if host not in wanted:
                del self._hosts[host]
        for host in wanted:
            self._hosts.setdefault(host, HostState())

    def state(self, host: str) -> HostState:
        self._advance()
        return self._hosts.setdefault(host, HostState())

    def is_ejected(self, host: str) -> bool:
        self._advance()
        state = self._hosts.get(host)
        return state is not None and state.ejected

    def available(self, hosts: Sequence[str]) -> list[str]:
        """``hosts`` minus the ejected ones (order kept)."""
        self._advance()
        return [h for h in hosts if not (h in self._hosts and self._hosts[h].ejected)]

    def ejected(self) -> list[str]:
        self._advance()
        return sorted(h for h, s in self._hosts.items() if s.ejected)

    # ------------------------------------------------------------ outcomes

    def record_success(self, host: str) -> None:
        self.record(host, 200)

    def record_local_failure(self, host: str, *, timeout: bool = False) -> bool:
        """A connection failure (counted as 503) or a timeout (504)."""
        return self.record(host, 504 if timeout else 503)

    def record(self, host: str, status: int) -> bool:
        """Report one answer of ``host``; return True if it was ejected by it."""
        self._advance()
        state = self._hosts.setdefault(host, HostState())
        if status < 500:
            state.consecutive_5xx = 0
            state.consecutive_gateway = 0
            return False
        state.consecutive_5xx += 1
        if status in GATEWAY_ERRORS:
            state.consecutive_gateway += 1
        else:
            state.consecutive_gateway = 0
        if state.ejected:
            return False
        policy = self._policy
        tripped = False
        if policy.consecutive_5xx_errors and state.consecutive_5xx >= policy.consecutive_5xx_errors:
            tripped = True
        if (
            policy.consecutive_gateway_errors
            and state.consecutive_gateway >= policy.consecutive_gateway_errors
        ):
            tripped = True
        if not tripped:
            return False
        state.consecutive_5xx = 0
        state.consecutive_gateway = 0
        return self._eject(host, state)

    def _eject(self, host: str, state: HostState) -> bool:
        total = len(self._hosts)
        active = sum(1 for s in self._hosts.values() if s.ejected)
        if active > 0 and (active + 1) * 100 > self._policy.max_ejection_percent * total:
            return False
        state.ejected_at = self._clock()
        state.times_ejected += 1
        state.total_ejections += 1
        if self._on_eject is not None:
            self._on_eject(host)
        return True

    # ------------------------------------------------------------ interval ticks

    def _advance(self) -> None:
        now = self._clock()
        interval = self._policy.interval_seconds
        while self._next_tick <= now:
            tick = self._next_tick
            busy = False
            for state in self._hosts.values():
                if state.ejected_at is not None:
                    busy = True
                    ejection_time = self._policy.base_ejection_time_seconds * state.times_ejected
                    if tick - state.ejected_at >= ejection_time:
                        state.ejected_at = None
                        state.consecutive_5xx = 0
                        state.consecutive_gateway = 0
                elif state.times_ejected > 0:
                    busy = True
                    state.times_ejected -= 1
            if busy:
                self._next_tick = tick + interval
            else:
                # Nothing to evaluate: jump to the last tick not after now.
                skipped = int((now - tick) // interval)
                self._next_tick = tick + (skipped + 1) * interval
