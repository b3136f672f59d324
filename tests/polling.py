"""Poll a condition until it holds or a deadline passes: the suite's one wait helper.

Tests never sleep to wait for something; they poll a condition with a deadline
(`await eventually(...)` in async tests, `eventually_sync(...)` in threads and
synchronous tests). The condition returns a truthy value when it holds; that value is
returned, so a poll can also fetch what it waited for. An exception the condition raises
propagates at once (a poll that must tolerate errors catches them in its condition).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

__all__ = ["eventually", "eventually_sync"]

T = TypeVar("T")

_EVERY = 0.02


async def eventually(
    condition: Callable[[], T | Awaitable[T]],
    *,
    timeout: float,
    what: str,
    every: float = _EVERY,
) -> T:
    """Await until `condition()` (sync or async) is truthy; return it, or fail after `timeout` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(every)  # polling a condition with a deadline


def eventually_sync(
    condition: Callable[[], T],
    *,
    timeout: float,
    what: str,
    every: float = _EVERY,
) -> T:
    """The blocking twin of `eventually`, for synchronous tests and helper threads."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)  # polling a condition with a deadline
