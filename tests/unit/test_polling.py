"""The suite's poll helper: returns the condition's value, fails naming what it waited for."""

from __future__ import annotations

import pytest

from tests.polling import eventually, eventually_sync


async def test_eventually_returns_the_first_truthy_value_of_a_sync_or_async_condition() -> None:
    answers = iter([None, 0, "ready"])

    async def later() -> str:
        return "async ready"

    assert await eventually(lambda: next(answers), timeout=5, what="a value") == "ready"
    assert await eventually(later, timeout=5, what="a value") == "async ready"


async def test_eventually_fails_after_the_timeout_naming_what_it_waited_for() -> None:
    with pytest.raises(AssertionError, match="waiting for the impossible"):
        await eventually(lambda: False, timeout=0.05, what="the impossible", every=0.01)


def test_eventually_sync_returns_the_value_or_fails_naming_it() -> None:
    answers = iter([False, 42])
    assert eventually_sync(lambda: next(answers), timeout=5, what="a value") == 42
    with pytest.raises(AssertionError, match="waiting for nothing"):
        eventually_sync(lambda: None, timeout=0.05, what="nothing", every=0.01)


async def test_an_error_in_the_condition_propagates_at_once() -> None:
    def broken() -> bool:
        raise ValueError("broken condition")

    with pytest.raises(ValueError, match="broken condition"):
        await eventually(broken, timeout=5, what="anything")
