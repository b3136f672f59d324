"""specmesh.aio.cancel_and_wait: cancels, waits, swallows only the task's cancellation."""

from __future__ import annotations

import asyncio

import pytest

from specmesh.aio import cancel_and_wait


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
