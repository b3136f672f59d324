"""A resumable prefix watch on etcd.

:class:`PrefixWatcher` first reads everything under the prefix (a *reset* update
holding the snapshot and its store revision), then streams changes from the next
revision. When the stream breaks (etcd stopped, connection lost) or stalls (no message,
not even a progress notification, within its read deadline: a half-open connection or a
frozen etcd), it reconnects with backoff from the last revision it delivered + 1, so
changes made meanwhile arrive once, none twice. When etcd answers that the revision is
compacted, it reads everything again and delivers another reset.

Each stream is read by an asyncio task (:meth:`specmesh.etcd.EtcdClient.watch`) that
queues its messages; :meth:`PrefixWatcher.close` cancels it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from specmesh.backoff import BackoffPolicy, Reconnect
from specmesh.errors import CompactedError, StoreError, StoreUnavailableError, WatchStalledError
from specmesh.etcd import KV, EtcdClient, WatchEvent, WatchResponse

__all__ = ["PrefixWatcher", "WatchEvent", "WatchUpdate"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WatchUpdate:
    """Either a reset (``snapshot`` holds every key at ``revision``) or incremental events
    (all events of one or more store revisions, up to ``revision``)."""

    revision: int
    events: tuple[WatchEvent, ...] = ()
    snapshot: dict[str, KV] | None = None

    @property
    def reset(self) -> bool:
        return self.snapshot is not None


_END = object()


class _Stream:
    """One watch stream, read by a task, consumed through a queue."""

    def __init__(
        self, etcd: EtcdClient, prefix: str, start_revision: int, read_timeout: float | None
    ) -> None:
        self.queue: asyncio.Queue[WatchResponse | Exception | object] = asyncio.Queue()
        self._task = asyncio.create_task(
            self._read(etcd, prefix, start_revision, read_timeout), name=f"etcd watch {prefix}"
        )

    async def _read(
        self, etcd: EtcdClient, prefix: str, start_revision: int, read_timeout: float | None
    ) -> None:
        try:
            async for response in etcd.watch(
                prefix, prefix=True, start_revision=start_revision, read_timeout=read_timeout
            ):
                self.queue.put_nowait(response)
        except Exception as e:  # handed to the consumer, which decides
            self.queue.put_nowait(e)
        finally:
            self.queue.put_nowait(_END)

    def close(self) -> None:
        self._task.cancel()


class PrefixWatcher:
    """Deliver every change under ``prefix``, surviving etcd restarts, stalls and compaction.

    ``read_timeout`` is the stream's read deadline (default: the client's
    ``watch_timeout``); ``sleep`` waits out a backoff delay (tests pass one that waits on
    an event). ``reconnects``, ``stalls`` (deadlines expired), ``resets`` and
    ``progress_notifications`` count what happened, for metrics and tests.
    """

    def __init__(
        self,
        *,
        etcd: EtcdClient,
        prefix: str,
        start_revision: int | None = None,
        retry_initial: float = 0.05,
        retry_max: float = 2.0,
        read_timeout: float | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.etcd = etcd
        self.prefix = prefix
        self.last_revision: int | None = None if start_revision is None else start_revision - 1
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.read_timeout = read_timeout
        self._sleep = sleep
        self.reconnects = 0
        self.stalls = 0
        self.resets = 0
        self.progress_notifications = 0
        self._stream: _Stream | None = None
        self._closed = False

    def _policy(self) -> BackoffPolicy:
        return BackoffPolicy(
            initial=self.retry_initial,
            maximum=max(self.retry_max, self.retry_initial),
            jitter=self.retry_initial,
        )

    def close(self) -> None:
        self._closed = True
        if self._stream is not None:
            self._stream.close()

    async def _reread(self) -> WatchUpdate:
        reconnect = Reconnect(self._policy(), sleep=self._sleep)
        while True:
            try:
                result = await self.etcd.range(self.prefix, prefix=True)
            except StoreUnavailableError as e:
                logger.warning("etcd unavailable while reading %s: %s", self.prefix, e.reason)
                await reconnect.wait()
                continue
            self.last_revision = result.revision
            self.resets += 1
            return WatchUpdate(revision=result.revision, snapshot={kv.key: kv for kv in result.kvs})

    async def updates(self) -> AsyncIterator[WatchUpdate]:
        """The updates, forever (until :meth:`close` or cancellation)."""
        try:
            if self.last_revision is None:
                yield await self._reread()
            reconnect = Reconnect(self._policy(), sleep=self._sleep)
            while not self._closed:
                assert self.last_revision is not None
                self._stream = _Stream(
                    self.etcd, self.prefix, self.last_revision + 1, self.read_timeout
                )
                try:
                    async for update in self._consume(self._stream):
                        reconnect.reset()
                        if update is not None:
                            yield update
                except CompactedError as e:
                    logger.info("watch on %s compacted (%s); reading everything", self.prefix, e)
                    self._stream.close()
                    yield await self._reread()
                    continue
                except WatchStalledError as e:
                    self.stalls += 1
                    logger.warning(
                        "watch on %s stalled: %s; reconnecting from revision %d",
                        self.prefix,
                        e.reason,
                        self.last_revision + 1,
                    )
                except StoreError as e:
                    logger.warning(
                        "watch on %s broke: %s; reconnecting from revision %d",
                        self.prefix,
                        e,
                        self.last_revision + 1,
                    )
                finally:
                    self._stream.close()
                if self._closed:
                    return
                self.reconnects += 1
                await reconnect.wait()
        finally:
            self.close()

    async def _consume(self, stream: _Stream) -> AsyncIterator[WatchUpdate | None]:
        """The stream's updates; ``None`` for a progress notification (the stream lives).
        Returns when the stream ends; raises what broke it."""
        while True:
            item = await stream.queue.get()
            if item is _END:
                return
            if isinstance(item, Exception):
                raise item
            assert isinstance(item, WatchResponse) and self.last_revision is not None
            if item.created:
                continue
            if item.progress:
                self.progress_notifications += 1
                # every change up to item.revision has been sent: nothing missed
                self.last_revision = max(self.last_revision, item.revision)
                yield None
                continue
            events = tuple(e for e in item.events if e.mod_revision > self.last_revision)
            if events:
                self.last_revision = max(e.mod_revision for e in events)
                yield WatchUpdate(revision=self.last_revision, events=events)
