"""The project's one backoff policy, on tenacity.

Every wait-then-try-again in engine, sidecar, control plane and supervisor goes through
here, so they all back off the same way::

    delay(n) = min(initial * factor ** (n - 1) + uniform(0, jitter), maximum)

(tenacity's ``wait_exponential_jitter``; ``n`` counts failures since the last reset).

Two shapes of use:

* **A call retried a bounded number of times** (a model call, a store read):
  :meth:`BackoffPolicy.retrying` returns a ``tenacity.AsyncRetrying`` with the policy's
  wait, an attempt limit and/or the policy's ``deadline``, and ``reraise=True`` (the last
  error is raised as itself, never wrapped in ``RetryError``). A failure may carry its own
  delay (``hint``: a 429's ``Retry-After``), capped at ``maximum``.
* **A long-lived connection that is reopened forever** (a watch, a stream, an MCP
  session): a :class:`Reconnect` keeps the failure count. Call :meth:`Reconnect.connected`
  when the connection is up; once it has stayed up ``healthy_after`` seconds the next
  failure starts again from ``initial`` (a flapping connection -- up, down at once -- keeps
  backing off). :meth:`Reconnect.reset` resets at once (a message arrived: the connection
  works). :meth:`Reconnect.wait` sleeps the next delay, or less when a stop event is set.

Both take an injectable ``sleep`` and ``clock`` so tests run without the wall clock.
Errors: :class:`BackoffDeadlineError` when a :class:`Reconnect` has failed for longer
than the policy's ``deadline``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import tenacity
from tenacity import AsyncRetrying, RetryCallState
from tenacity.retry import retry_base
from tenacity.stop import stop_base

__all__ = ["BackoffDeadlineError", "BackoffPolicy", "Clock", "Reconnect", "Sleep"]

Sleep = Callable[[float], Awaitable[Any]]
"""How to wait ``seconds`` (``asyncio.sleep``; a recording fake in tests)."""
Clock = Callable[[], float]
"""A monotonic clock in seconds (``time.monotonic``; a fake in tests)."""


_ANY_ERROR = tenacity.retry_if_exception_type()
"""Retry on any ``Exception``."""


class BackoffDeadlineError(Exception):
    """A connection kept failing for longer than the policy's ``deadline``."""

    def __init__(self, *, failing_for: float, deadline: float, attempts: int) -> None:
        super().__init__(
            f"still failing after {failing_for:.1f} s and {attempts} attempts "
            f"(deadline {deadline:.1f} s)"
        )
        self.failing_for = failing_for
        self.deadline = deadline
        self.attempts = attempts


@dataclass(frozen=True, kw_only=True)
class BackoffPolicy:
    """Exponential backoff with jitter, a cap, an optional deadline and a healthy reset."""

    initial: float = 0.2
    """First delay, in seconds."""
    maximum: float = 5.0
    """No delay is longer (jitter included)."""
    factor: float = 2.0
    """Each failure multiplies the delay by this."""
    jitter: float = 0.1
    """Up to this many seconds are added at random (0: none), so peers spread out."""
    deadline: float | None = None
    """Give up after failing this many seconds in a row (None: never)."""
    healthy_after: float | None = None
    """A connection up this long resets the count (None: ``maximum``)."""

    def __post_init__(self) -> None:
        problems = []
        if not self.initial > 0:
            problems.append(f"initial must be > 0 (got {self.initial})")
        if not self.maximum >= self.initial:
            problems.append(f"maximum must be >= initial (got {self.maximum} < {self.initial})")
        if not self.factor >= 1:
            problems.append(f"factor must be >= 1 (got {self.factor})")
        if not self.jitter >= 0:
            problems.append(f"jitter must be >= 0 (got {self.jitter})")
        if self.deadline is not None and not self.deadline > 0:
            problems.append(f"deadline must be > 0 (got {self.deadline})")
        if self.healthy_after is not None and not self.healthy_after >= 0:
            problems.append(f"healthy_after must be >= 0 (got {self.healthy_after})")
        if problems:
            raise ValueError("BackoffPolicy: " + "; ".join(problems))

    @property
    def healthy_period(self) -> float:
        return self.maximum if self.healthy_after is None else self.healthy_after

    def wait(self) -> tenacity.wait.wait_base:
        """The policy as a tenacity wait strategy."""
        return tenacity.wait_exponential_jitter(
            multiplier=self.initial, max=self.maximum, exp_base=self.factor, jitter=self.jitter
        )

    def delay(self, attempt: int) -> float:
        """The wait after the ``attempt``-th failure in a row (1-based)."""
        if attempt < 1:
            raise ValueError(f"attempt must be >= 1 (got {attempt})")
        state = RetryCallState(tenacity.Retrying(), None, (), {})
        state.attempt_number = attempt
        return float(self.wait()(state))

    def retrying(
        self,
        *,
        retry: retry_base | Callable[[RetryCallState], bool] = _ANY_ERROR,
        attempts: int | None = None,
        hint: Callable[[BaseException], float | None] | None = None,
        before_sleep: Callable[[RetryCallState], Any] | None = None,
        sleep: Sleep = asyncio.sleep,
        clock: Clock = time.monotonic,
    ) -> AsyncRetrying:
        """A tenacity retrier with this policy: at most ``attempts`` attempts (None: no
        limit) and, when the policy has one, no retry once ``deadline`` has passed since
        the first attempt. ``hint(error)`` may give the delay the failure asks for (capped
        at ``maximum``). The last error is raised as itself."""
        if attempts is not None and attempts < 1:
            raise ValueError(f"attempts must be >= 1 (got {attempts})")
        stops: list[stop_base] = []
        if attempts is not None:
            stops.append(tenacity.stop_after_attempt(attempts))
        if self.deadline is not None:
            stops.append(_StopAfter(self.deadline, clock))
        stop: stop_base = tenacity.stop_any(*stops) if stops else tenacity.stop_never
        wait = self.wait()
        if hint is not None:
            wait = _Hinted(wait, hint, self.maximum)
        kwargs: dict[str, Any] = {}
        if before_sleep is not None:
            kwargs["before_sleep"] = before_sleep
        return AsyncRetrying(sleep=sleep, stop=stop, wait=wait, retry=retry, reraise=True, **kwargs)


class _StopAfter(stop_base):
    """Stop once ``deadline`` seconds passed since the first attempt (on ``clock``)."""

    def __init__(self, deadline: float, clock: Clock) -> None:
        self._deadline = deadline
        self._clock = clock
        self._started: dict[int, float] = {}

    def __call__(self, retry_state: RetryCallState) -> bool:
        started = self._started.setdefault(id(retry_state), self._clock())
        return self._clock() - started >= self._deadline


class _Hinted(tenacity.wait.wait_base):
    """The delay the failure asks for (capped), else the policy's."""

    def __init__(
        self,
        inner: tenacity.wait.wait_base,
        hint: Callable[[BaseException], float | None],
        maximum: float,
    ) -> None:
        self._inner = inner
        self._hint = hint
        self._maximum = maximum

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None and outcome.failed else None
        asked = self._hint(error) if error is not None else None
        if asked is not None:
            return min(max(asked, 0.0), self._maximum)
        return float(self._inner(retry_state))


class Reconnect:
    """The failure count of one long-lived connection under a :class:`BackoffPolicy`."""

    def __init__(
        self,
        policy: BackoffPolicy,
        *,
        sleep: Sleep = asyncio.sleep,
        clock: Clock = time.monotonic,
    ) -> None:
        self.policy = policy
        self._sleep = sleep
        self._clock = clock
        self._wait = policy.wait()
        self._state = RetryCallState(tenacity.Retrying(), None, (), {})
        self.attempts = 0
        """Failures in a row since the last reset."""
        self._up_since: float | None = None
        self._failing_since: float | None = None

    def connected(self) -> None:
        """The connection is up (it resets the count once up ``healthy_after`` seconds)."""
        self._up_since = self._clock()

    def reset(self) -> None:
        """The connection works: the next failure waits ``initial`` again."""
        self.attempts = 0
        self._up_since = None
        self._failing_since = None

    def next_delay(self) -> float:
        """Count one failure and return how long to wait before trying again.

        Raises :class:`BackoffDeadlineError` when failing longer than the deadline.
        """
        now = self._clock()
        if self._up_since is not None and now - self._up_since >= self.policy.healthy_period:
            self.reset()
        self._up_since = None
        if self._failing_since is None:
            self._failing_since = now
        self.attempts += 1
        deadline = self.policy.deadline
        if deadline is not None and now - self._failing_since >= deadline:
            raise BackoffDeadlineError(
                failing_for=now - self._failing_since, deadline=deadline, attempts=self.attempts
            )
        self._state.attempt_number = self.attempts
        return float(self._wait(self._state))

    async def wait(self, delay: float | None = None, *, stop: asyncio.Event | None = None) -> bool:
        """Sleep ``delay`` (default: :meth:`next_delay`), or less once ``stop`` is set;
        whether ``stop`` is set."""
        seconds = self.next_delay() if delay is None else delay
        if stop is None:
            await self._sleep(seconds)
            return False
        if stop.is_set():
            return True
        sleeping = asyncio.ensure_future(self._sleep(seconds))
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({sleeping, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (sleeping, stopping):
                t.cancel()
            await asyncio.gather(sleeping, stopping, return_exceptions=True)
        return stop.is_set()
