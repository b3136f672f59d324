"""Small asyncio helpers the three processes share."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

__all__ = ["cancel_and_wait"]


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
