"""specmesh.backoff: the one backoff policy, checked with a fake clock and sleep."""

from __future__ import annotations

import asyncio

import pytest
import tenacity

from specmesh.backoff import BackoffDeadlineError, BackoffPolicy, Reconnect


class FakeTime:
    """A clock that moves only when something sleeps on it."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_delays_double_from_initial_up_to_the_cap() -> None:
    policy = BackoffPolicy(initial=0.5, maximum=3.0, jitter=0)

    assert [policy.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_jitter_stays_within_its_bound_and_under_the_cap() -> None:
    policy = BackoffPolicy(initial=1.0, maximum=4.0, jitter=0.5)

    first = [policy.delay(1) for _ in range(200)]
    capped = [policy.delay(10) for _ in range(200)]

    assert all(1.0 <= d <= 1.5 for d in first)
    assert len(set(first)) > 1
    assert all(d == 4.0 for d in capped)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"initial": 0}, "initial must be > 0 (got 0)"),
        ({"initial": 2.0, "maximum": 1.0}, "maximum must be >= initial"),
        ({"factor": 0.5}, "factor must be >= 1"),
        ({"jitter": -1}, "jitter must be >= 0"),
        ({"deadline": 0}, "deadline must be > 0"),
    ],
)
def test_a_bad_policy_is_refused_naming_the_field(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        BackoffPolicy(**kwargs)


def test_reconnect_backs_off_and_resets() -> None:
    t = FakeTime()
    r = Reconnect(BackoffPolicy(initial=0.2, maximum=1.0, jitter=0), clock=t.clock)

    delays = [r.next_delay() for _ in range(4)]
    r.reset()

    assert delays == [0.2, 0.4, 0.8, 1.0]
    assert r.next_delay() == 0.2


def test_a_flapping_connection_keeps_backing_off() -> None:
    t = FakeTime()
    r = Reconnect(BackoffPolicy(initial=0.2, maximum=5.0, jitter=0), clock=t.clock)

    delays = []
    for _ in range(3):
        r.connected()
        t.now += 1.0  # up for less than healthy_after (= maximum)
        delays.append(r.next_delay())

    assert delays == [0.2, 0.4, 0.8]


def test_a_connection_up_for_the_healthy_period_starts_over() -> None:
    t = FakeTime()
    r = Reconnect(
        BackoffPolicy(initial=0.2, maximum=5.0, jitter=0, healthy_after=30.0), clock=t.clock
    )
    for _ in range(4):
        r.next_delay()

    r.connected()
    t.now += 30.0

    assert r.next_delay() == 0.2


def test_the_deadline_ends_a_reconnect_that_keeps_failing() -> None:
    t = FakeTime()
    r = Reconnect(BackoffPolicy(initial=1.0, maximum=1.0, jitter=0, deadline=2.5), clock=t.clock)

    for _ in range(3):
        t.now += r.next_delay()

    with pytest.raises(BackoffDeadlineError) as caught:
        r.next_delay()
    assert caught.value.deadline == 2.5
    assert caught.value.attempts == 4


async def test_wait_sleeps_the_next_delay_on_the_injected_sleep() -> None:
    t = FakeTime()
    r = Reconnect(BackoffPolicy(initial=0.3, maximum=1.0, jitter=0), sleep=t.sleep, clock=t.clock)

    stopped = [await r.wait(), await r.wait()]

    assert t.slept == [0.3, 0.6]
    assert stopped == [False, False]


async def test_wait_returns_early_once_stop_is_set() -> None:
    r = Reconnect(BackoffPolicy(initial=3600.0, maximum=3600.0, jitter=0))
    stop = asyncio.Event()

    waiting = asyncio.create_task(r.wait(stop=stop))
    stop.set()

    assert await asyncio.wait_for(waiting, timeout=10) is True


async def test_retrying_retries_then_raises_the_last_error_itself() -> None:
    t = FakeTime()
    calls = 0

    async def flaky() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError(f"attempt {calls}")

    with pytest.raises(ConnectionError, match="attempt 3"):
        async for attempt in BackoffPolicy(initial=0.1, maximum=1.0, jitter=0).retrying(
            attempts=3, sleep=t.sleep, clock=t.clock
        ):
            with attempt:
                await flaky()

    assert calls == 3
    assert t.slept == [0.1, 0.2]


async def test_retrying_stops_at_the_deadline_on_the_injected_clock() -> None:
    t = FakeTime()
    calls = 0
    policy = BackoffPolicy(initial=1.0, maximum=1.0, jitter=0, deadline=2.0)

    with pytest.raises(TimeoutError):
        async for attempt in policy.retrying(sleep=t.sleep, clock=t.clock):
            with attempt:
                calls += 1
                raise TimeoutError

    assert calls == 3  # at 0, 1 and 2 s; at 2 s the deadline has passed


async def test_retrying_uses_the_delay_the_failure_asks_for_capped() -> None:
    t = FakeTime()

    class Busy(Exception):
        def __init__(self, after: float | None) -> None:
            self.after = after

    asked = iter([30.0, None, 0.5])

    with pytest.raises(Busy):
        async for attempt in BackoffPolicy(initial=0.1, maximum=4.0, jitter=0).retrying(
            attempts=4,
            hint=lambda e: e.after if isinstance(e, Busy) else None,
            sleep=t.sleep,
            clock=t.clock,
        ):
            with attempt:
                raise Busy(next(asked, None))

    assert t.slept == [4.0, 0.2, 0.5]


async def test_retrying_does_not_retry_what_retry_refuses() -> None:
    t = FakeTime()
    calls = 0

    with pytest.raises(ValueError):
        async for attempt in BackoffPolicy().retrying(
            retry=tenacity.retry_if_exception_type(ConnectionError),
            attempts=5,
            sleep=t.sleep,
            clock=t.clock,
        ):
            with attempt:
                calls += 1
                raise ValueError

    assert calls == 1
    assert t.slept == []


def test_the_engine_refuses_a_reconnect_cap_below_the_first_delay() -> None:
    from pydantic import ValidationError

    from engine.settings import EngineSettings

    with pytest.raises(ValidationError, match="SPECMESH_SIDECAR_RECONNECT_MAX_SECONDS must be >="):
        EngineSettings(reconnect_initial_seconds=2.0, reconnect_max_seconds=5.0)
