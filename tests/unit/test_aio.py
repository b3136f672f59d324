"""specmesh.aio: cancel_and_wait cancels, waits, swallows only the task's cancellation;
wait_event never loses a cancellation."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable

import pytest

from specmesh.aio import cancel_and_wait, wait_event


async def test_none_is_a_no_op() -> None:
    await cancel_and_wait(None)


async def test_cancels_a_running_task_and_waits_for_its_cleanup() -> None:
    cleaned = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.set()

    task = asyncio.create_task(forever())
    await asyncio.sleep(0)  # let it start
    await cancel_and_wait(task)
    assert task.cancelled()
    assert cleaned.is_set()


async def test_an_error_other_than_cancellation_propagates() -> None:
    async def fails_on_cancel() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise RuntimeError("cleanup failed") from None

    task = asyncio.create_task(fails_on_cancel())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="cleanup failed"):
        await cancel_and_wait(task)


async def test_a_finished_task_is_left_as_it_was() -> None:
    async def done() -> int:
        return 7

    task = asyncio.create_task(done())
    await task
    await cancel_and_wait(task)
    assert task.result() == 7


async def _loop_cancelled_as_its_event_is_set(
    wait: Callable[[asyncio.Event], Awaitable[object]],
) -> asyncio.Task[None]:
    """A background loop that waits on an event, cancelled in the very step that sets the
    event (as a supervisor is stopped while a child's exit wakes it); the task, after it had
    5 s to end."""
    event = asyncio.Event()

    async def loop() -> None:
        while True:
            await wait(event)
            event.clear()

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)  # the loop now waits on the event
    event.set()
    task.cancel()
    await asyncio.wait({task}, timeout=5)
    return task


async def test_wait_event_tells_set_from_timed_out() -> None:
    event = asyncio.Event()
    assert await wait_event(event, 0) is False
    event.set()
    assert await wait_event(event, 0) is True


async def test_a_cancellation_as_the_event_is_set_stops_a_wait_event_loop() -> None:
    task = await _loop_cancelled_as_its_event_is_set(lambda event: wait_event(event, 60))
    assert task.cancelled()


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="wait_for keeps cancellations from 3.12")
async def test_asyncio_wait_for_loses_that_cancellation_on_this_python() -> None:
    """Why wait_event exists: the same loop on asyncio.wait_for goes on (cpython#86296)."""
    task = await _loop_cancelled_as_its_event_is_set(
        lambda event: asyncio.wait_for(event.wait(), 60)
    )
    assert not task.done()
    task.cancel()  # a second cancellation, while it only waits, does stop it
    await asyncio.wait({task}, timeout=5)
    assert task.cancelled()
