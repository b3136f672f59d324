"""The resumable watch against a real etcd that is stopped, restarted and compacted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from specmesh.errors import StoreUnavailableError
from specmesh.etcd import EtcdClient
from specmesh.services import EtcdProcess, free_port
from specmesh.watch import PrefixWatcher, WatchUpdate

pytestmark = pytest.mark.integration


@pytest.fixture
async def own_etcd(tmp_path: Path) -> AsyncIterator[EtcdProcess]:
    proc = EtcdProcess(data_dir=tmp_path / "etcd", client_port=free_port(), peer_port=free_port())
    await asyncio.to_thread(proc.start)
    yield proc
    await asyncio.to_thread(proc.stop)


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
    await asyncio.sleep(0.5)  # let the watcher notice the broken stream and start retrying
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
