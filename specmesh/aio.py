"""Small asyncio helpers the three processes share."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

__all__ = ["cancel_and_wait", "wait_event"]


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background task and wait until it has finished; ``None`` is a no-op.

    The task's ``CancelledError`` is swallowed (the caller asked for it); any other error it
    ends with propagates.
    """
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait at most ``timeout`` seconds for ``event``; whether it is set.

    For the loops of background tasks: unlike ``asyncio.wait_for`` on Python 3.11, a
    cancellation that arrives just as the event is set is never lost (there ``wait_for``
    returns the event's result and swallows the cancellation, python/cpython#86296, so a
    loop that is told to stop goes on, and whoever awaits it hangs).
    """
    try:
        async with asyncio.timeout(max(timeout, 0.0)):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True
