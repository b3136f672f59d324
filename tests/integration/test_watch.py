"""The etcd client and the resumable watch against a real etcd of their own that is
stopped, restarted, frozen (SIGSTOP: the sockets stay open, nothing answers) and compacted."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from localfleet.installer import EtcdProcess
from specmesh.errors import StoreUnavailableError
from specmesh.etcd import EtcdClient
from specmesh.ports import free_port
from specmesh.watch import PrefixWatcher, WatchUpdate
from tests.polling import eventually

pytestmark = pytest.mark.integration

PROGRESS_INTERVAL = 1.0
"""Seconds between etcd's progress notifications to a quiet watch, in these tests."""
READ_DEADLINE = 3 * PROGRESS_INTERVAL
"""The watches' read deadline here: three intervals, as the default (15 s for 5 s)."""


@pytest.fixture
async def own_etcd(tmp_path: Path) -> AsyncIterator[EtcdProcess]:
    proc = EtcdProcess(
        data_dir=tmp_path / "etcd",
        client_port=free_port(),
        peer_port=free_port(),
        progress_notify_interval=f"{PROGRESS_INTERVAL:g}s",
    )
    await asyncio.to_thread(proc.start)
    yield proc
    if proc.pid is not None:
        os.kill(proc.pid, signal.SIGCONT)  # a failed test may leave it frozen
    await asyncio.to_thread(proc.stop)


@contextmanager
def _frozen(proc: EtcdProcess) -> Iterator[None]:
    """etcd stopped in its tracks: connections stay open and are accepted, nothing answers."""
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)


async def _next(it: AsyncIterator[WatchUpdate], timeout: float = 30) -> WatchUpdate:
    return await asyncio.wait_for(it.__anext__(), timeout=timeout)


async def _collect_until(
    it: AsyncIterator[WatchUpdate], keys: set[str], seen: list[str], timeout: float = 30
) -> None:
    async def run() -> None:
        while not keys.issubset(seen):
            update = await it.__anext__()
            assert not update.reset, "no reset expected here"
            seen.extend(e.key for e in update.events)

    await asyncio.wait_for(run(), timeout=timeout)


async def test_watch_resumes_after_etcd_restart_without_loss_or_duplicates(
    own_etcd: EtcdProcess,
) -> None:
    client = EtcdClient(host=own_etcd.host, port=own_etcd.client_port, timeout=2)
    writer = EtcdClient(host=own_etcd.host, port=own_etcd.client_port, timeout=2)
    await client.put("/w/a", "1")
    watcher = PrefixWatcher(etcd=client, prefix="/w/", retry_max=0.2)
    it = watcher.updates()
    first = await _next(it)
    assert first.reset and first.snapshot is not None and list(first.snapshot) == ["/w/a"]
    seen: list[str] = []
    await writer.put("/w/b", "2")
    await _collect_until(it, {"/w/b"}, seen)

    # etcd goes down while the watch is open: writes fail with a clear error meanwhile;
    # once it is back, what is written arrives through the resumed watch.
    await asyncio.to_thread(own_etcd.stop)
    with pytest.raises(StoreUnavailableError):
        await writer.put("/w/lost", "x")
    pending = asyncio.ensure_future(_collect_until(it, {f"/w/c{i}" for i in range(20)}, seen))
    # the watcher notices the broken stream and starts retrying
    await eventually(lambda: watcher.reconnects >= 1, timeout=30, what="a watch reconnect")
    await asyncio.to_thread(own_etcd.start)
    for i in range(20):
        await writer.put(f"/w/c{i}", str(i))
    await pending

    assert seen == ["/w/b"] + [f"/w/c{i}" for i in range(20)]  # all, in order, none twice
    assert watcher.reconnects >= 1
    watcher.close()
    await client.close()
    await writer.close()


async def test_watch_changes_made_while_etcd_is_down_for_the_watcher(
    own_etcd: EtcdProcess,
) -> None:
    """Changes committed while the watcher is disconnected arrive after it resumes."""
    client = EtcdClient(host=own_etcd.host, port=own_etcd.client_port, timeout=2)
    writer = EtcdClient(host=own_etcd.host, port=own_etcd.client_port, timeout=2)
    watcher = PrefixWatcher(etcd=client, prefix="/w/", retry_max=0.2)
    it = watcher.updates()
    assert (await _next(it)).reset
    await writer.put("/w/before", "0")
    seen: list[str] = []
    await _collect_until(it, {"/w/before"}, seen)

    # Break the watcher's stream by restarting etcd, and write before the watcher is back:
    # stop, start, write at once (the watcher is still sleeping in its backoff).
    watcher.retry_initial = 1.0
    await asyncio.to_thread(own_etcd.restart)
    for i in range(10):
        await writer.put(f"/w/d{i}", str(i))
    await _collect_until(it, {f"/w/d{i}" for i in range(10)}, seen)

    assert seen == ["/w/before"] + [f"/w/d{i}" for i in range(10)]
    watcher.close()
    await client.close()
    await writer.close()


async def test_compacted_revision_triggers_full_reread(own_etcd: EtcdProcess) -> None:
    client = EtcdClient(host=own_etcd.host, port=own_etcd.client_port, timeout=2)
    await client.put("/w/a", "1")
    start = await client.revision()
    for i in range(5):
        await client.put("/w/a", str(i + 2))
    await client.put("/w/z", "last")
    await client.compact(await client.revision())

    watcher = PrefixWatcher(etcd=client, prefix="/w/", start_revision=start)
    it = watcher.updates()
    update = await _next(it)

    assert update.reset and update.snapshot is not None
    assert {k: kv.value for k, kv in update.snapshot.items()} == {"/w/a": b"6", "/w/z": b"last"}
    await client.put("/w/after", "x")
    nxt = await _next(it)
    assert [e.key for e in nxt.events] == ["/w/after"]
    watcher.close()
    await client.close()


async def test_a_watch_on_a_frozen_etcd_notices_within_its_deadline_and_loses_nothing(
    own_etcd: EtcdProcess,
) -> None:
    """A half-open stream (etcd frozen, socket open) is noticed by the read deadline; the
    watch reconnects from its last delivered revision + 1, so the changes committed between
    that revision and the reconnect arrive once, and so do the later ones."""
    client = EtcdClient(
        host=own_etcd.host, port=own_etcd.client_port, timeout=2, watch_timeout=READ_DEADLINE
    )
    writer = EtcdClient(host=own_etcd.host, port=own_etcd.client_port, timeout=10)
    hold = asyncio.Event()  # set: the watcher's next backoff waits for `release`
    parked = asyncio.Event()
    release = asyncio.Event()

    async def backoff(delay: float) -> None:
        if hold.is_set():
            parked.set()
            await release.wait()
        else:
            await asyncio.sleep(delay)

    watcher = PrefixWatcher(etcd=client, prefix="/w/", retry_max=0.2, sleep=backoff)
    it = watcher.updates()
    assert (await _next(it)).reset
    await writer.put("/w/k1", "1")
    seen: list[str] = []
    await _collect_until(it, {"/w/k1"}, seen)
    gap = [f"/w/gap{i}" for i in range(10)]
    later = [f"/w/later{i}" for i in range(10)]
    pending = asyncio.ensure_future(_collect_until(it, set(gap + later), seen, timeout=120))

    with _frozen(own_etcd):
        await eventually(
            lambda: watcher.stalls >= 1, what="the watcher notices the frozen stream", timeout=30
        )
        # its reconnect meets the frozen etcd too (accepted, unanswered) and stalls as well
        await eventually(
            lambda: watcher.stalls >= 2, what="a reconnect to the frozen etcd stalls", timeout=30
        )
        hold.set()
        await asyncio.wait_for(parked.wait(), timeout=30)
    # etcd continues; the watcher waits in its backoff: these commit before it reconnects
    for key in gap:
        await writer.put(key, "g")
    hold.clear()
    release.set()
    for key in later:
        await writer.put(key, "l")
    await pending

    assert seen == ["/w/k1", *gap, *later]  # all, in order, none twice
    assert watcher.resets == 1  # resumed from its revision, never re-read everything
    assert watcher.reconnects >= 2
    assert not pending.exception()
    watcher.close()
    await client.close()
    await writer.close()


async def test_a_quiet_watch_is_kept_alive_by_progress_notifications(
    own_etcd: EtcdProcess,
) -> None:
    """A healthy watch with nothing to report outlives its read deadline: etcd's progress
    notifications reset it, and advance the revision the watch would resume from."""
    client = EtcdClient(
        host=own_etcd.host, port=own_etcd.client_port, timeout=2, watch_timeout=READ_DEADLINE
    )
    await client.put("/other/x", "1")  # moves the store revision, not the watched prefix
    watcher = PrefixWatcher(etcd=client, prefix="/w/", start_revision=1)
    it = watcher.updates()
    waiting = asyncio.ensure_future(_next(it, timeout=60))
    await client.put("/other/y", "2")
    revision = await client.revision()
    quiet_for = READ_DEADLINE / PROGRESS_INTERVAL + 2
    await eventually(
        lambda: watcher.progress_notifications >= quiet_for,
        what=f"{quiet_for:g} progress notifications",
        timeout=30,
    )

    assert watcher.stalls == 0 and watcher.reconnects == 0
    assert watcher.last_revision == revision
    await client.put("/w/a", "1")
    update = await waiting
    assert [e.key for e in update.events] == ["/w/a"]
    watcher.close()
    await client.close()


async def test_a_request_to_a_frozen_etcd_leaves_the_loop_free(own_etcd: EtcdProcess) -> None:
    """The client never blocks the event loop: while etcd is frozen a put waits, other
    coroutines run, and the put completes once etcd continues."""
    client = EtcdClient(host=own_etcd.host, port=own_etcd.client_port, timeout=60)
    await client.put("/w/warm", "0")  # the connection exists before the freeze
    with _frozen(own_etcd):
        put = asyncio.create_task(client.put("/w/a", "1"))
        ticks = 0
        for _ in range(100):  # the loop runs other coroutines while the put waits
            await asyncio.sleep(0)
            ticks += 1
        assert ticks == 100 and not put.done()
    revision = await asyncio.wait_for(put, timeout=60)
    kv = await client.get("/w/a")
    assert kv is not None and kv.mod_revision == revision
    await client.close()


async def test_a_frozen_etcd_is_reported_unavailable_after_the_request_timeout(
    own_etcd: EtcdProcess,
) -> None:
    client = EtcdClient(host=own_etcd.host, port=own_etcd.client_port, timeout=0.5)
    with _frozen(own_etcd), pytest.raises(StoreUnavailableError, match=r"no answer within 0\.5 s"):
        await client.range("/w/", prefix=True)
    await client.close()
