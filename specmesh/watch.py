"""A resumable prefix watch on etcd.

:class:`PrefixWatcher` first reads everything under the prefix (a *reset* update
holding the snapshot and its store revision), then streams changes from the next
revision. When the stream breaks (etcd stopped, connection lost) it reconnects with
backoff from the last revision it delivered, so changes made meanwhile arrive once,
none twice. When etcd answers that the revision is compacted, it reads everything
again and delivers another reset.

The gateway's watch stream is read by a thread per watcher (``requests`` is
blocking); updates reach the event loop through a queue.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import requests

from specmesh.backoff import BackoffPolicy, Reconnect
from specmesh.errors import CompactedError, StoreUnavailableError
from specmesh.etcd import KV, EtcdClient, prefix_end

__all__ = ["PrefixWatcher", "WatchEvent", "WatchUpdate"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WatchEvent:
    """One change of one key."""

    type: Literal["put", "delete"]
    key: str
    value: bytes
    mod_revision: int


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
    """One gateway watch stream, read on a thread, consumed from the event loop."""

    def __init__(self, etcd: EtcdClient, prefix: str, start_revision: int) -> None:
        self._url = etcd.raw.get_url("/watch")
        self._payload: dict[str, Any] = {
            "create_request": {
                "key": base64.b64encode(prefix.encode()).decode(),
                "range_end": base64.b64encode(prefix_end(prefix)).decode(),
                "start_revision": str(start_revision),
                "progress_notify": True,
            }
        }
        self._timeout = etcd.timeout
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._session = requests.Session()
        self._response: requests.Response | None = None
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._read, name="etcd-watch", daemon=True)
        self._thread.start()

    def _emit(self, item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # loop closed
            self._loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def _read(self) -> None:
        try:
            self._response = self._session.post(
                self._url, json=self._payload, stream=True, timeout=(self._timeout, None)
            )
            if self._response.status_code != 200:
                raise StoreUnavailableError(
                    endpoint=self._url, reason=f"watch answered HTTP {self._response.status_code}"
                )
            # chunk_size=None: yield each gateway message as it arrives (not per 512 bytes)
            for line in self._response.iter_lines(chunk_size=None):  # type: ignore[call-overload]
                if self._closed.is_set():
                    break
                if line.strip():
                    self._emit(json.loads(line))
        except Exception as e:
            if not self._closed.is_set():
                self._emit(e)
        finally:
            self._emit(_END)

    def close(self) -> None:
        self._closed.set()
        response = self._response
        if response is not None:
            with contextlib.suppress(Exception):
                response.raw._fp.fp.raw._sock.shutdown(2)  # unblock the reading thread
            with contextlib.suppress(Exception):
                response.close()
        self._session.close()


class PrefixWatcher:
    """Deliver every change under ``prefix``, surviving etcd restarts and compaction."""

    def __init__(
        self,
        *,
        etcd: EtcdClient,
        prefix: str,
        start_revision: int | None = None,
        retry_initial: float = 0.05,
        retry_max: float = 2.0,
    ) -> None:
        self.etcd = etcd
        self.prefix = prefix
        self.last_revision: int | None = None if start_revision is None else start_revision - 1
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.reconnects = 0
        self.resets = 0
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
        reconnect = Reconnect(self._policy())
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
            reconnect = Reconnect(self._policy())
            while not self._closed:
                assert self.last_revision is not None
                self._stream = _Stream(self.etcd, self.prefix, self.last_revision + 1)
                try:
                    async for update in self._consume(self._stream):
                        reconnect.reset()
                        yield update
                except CompactedError as e:
                    logger.info("watch on %s compacted (%s); reading everything", self.prefix, e)
                    self._stream.close()
                    yield await self._reread()
                    continue
                finally:
                    self._stream.close()
                if self._closed:
                    return
                self.reconnects += 1
                await reconnect.wait()
        finally:
            self.close()

    async def _consume(self, stream: _Stream) -> AsyncIterator[WatchUpdate]:
        while True:
            item = await stream.queue.get()
            if item is _END:
                return
            if isinstance(item, Exception):
                logger.warning("watch on %s broke: %s; resuming", self.prefix, item)
                return
            if "error" in item:
                logger.warning("watch on %s: etcd error %s; resuming", self.prefix, item["error"])
                return
            result = item.get("result", {})
            compact = int(result.get("compact_revision", 0) or 0)
            if compact:
                assert self.last_revision is not None
                raise CompactedError(requested=self.last_revision + 1, compact_revision=compact)
            if result.get("canceled"):
                return
            assert self.last_revision is not None
            events = tuple(
                e
                for e in (_event(raw) for raw in result.get("events", []))
                if e.mod_revision > self.last_revision
            )
            header_rev = int(result.get("header", {}).get("revision", 0) or 0)
            if events:
                self.last_revision = max(e.mod_revision for e in events)
                yield WatchUpdate(revision=self.last_revision, events=events)
            elif not result.get("created") and header_rev > self.last_revision:
                self.last_revision = header_rev  # progress notification: nothing missed


def _event(raw: dict[str, Any]) -> WatchEvent:
    kv = raw["kv"]
    return WatchEvent(
        type="delete" if raw.get("type") == "DELETE" else "put",
        key=base64.b64decode(kv["key"]).decode(),
        value=base64.b64decode(kv.get("value", "")),
        mod_revision=int(kv.get("mod_revision", 0)),
    )
